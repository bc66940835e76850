"""The torch part: PyTorch DDP on mpify's ranks, and what the engine needs of torch.

- ctx.py: the user API, `TorchDDPCtx`, `torchddp_launch`, `in_torchddp` (and `ddp=True` of a World);
- store.py: the TCPStore a launch or world hosts for its ranks, registered with the engine;
- codec.py: tensors through shared memory and CUDA IPC handles, registered with the engine.

The engine never imports this package: store.py and codec.py register themselves with it on
import (mpify/__init__.py imports them with the public names), and neither imports torch before
it is used nor the user API. Nothing is imported here, so that importing one of them loads no
other.
"""

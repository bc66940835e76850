"""Torch tensors through shared memory and CUDA IPC handles (the codec engine/args/shm.py uses).

A large dense CPU tensor travels as its bytes in a shared-memory file, not N pickles; a CUDA
tensor as a CUDA IPC handle to its memory, as torch.multiprocessing sends it. engine/args/shm.py never
imports torch itself, so this module registers both kinds with it on import; torch is imported
only inside the functions (or looked up in sys.modules: a tensor exists only once the caller
imported torch). It needs neither the user API (ctx.py) nor the launcher.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any

from mpify.engine.args import shm


def _is_pinned(t: Any) -> bool:
    # Pinned memory exists only once CUDA was initialised; asking before would create a CUDA
    # context in the caller for nothing.
    cuda = sys.modules["torch"].cuda
    return cuda.is_initialized() and t.is_pinned()


def _is_plain_cpu_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None or type(obj) not in (torch.Tensor, torch.nn.Parameter):
        return False
    # Only dense CPU tensors are a plain buffer; CUDA, sparse, quantized ones keep torch's pickling.
    # Pinned ones of any size come this way, so that they can arrive pinned.
    return (obj.device.type == "cpu" and obj.layout == torch.strided and not obj.is_quantized
            and (obj.nbytes >= shm.THRESHOLD or obj.nbytes > 0 and _is_pinned(obj)))


def _dump_tensor(t):
    import torch
    data = t.detach().resolve_conj().resolve_neg().contiguous()
    meta = (t.dtype, tuple(t.shape), t.requires_grad, type(t) is torch.nn.Parameter, _is_pinned(t))
    # No copy was needed: the buffer is t's own memory, owned by its storage (kept between
    # launches as a snapshot, see engine/args/resident.py).
    alias = (t.untyped_storage(), t.data_ptr()) if data.data_ptr() == t.data_ptr() and t.numel() else None
    # The bytes by address, not through data.numpy(): a numpy view marks the storage
    # non-resizable for good, and the caller's `t.resize_()` would fail after the launch.
    buf = (ctypes.c_char * data.nbytes).from_address(data.data_ptr())
    buf.keep = data  # a contiguous copy must live while the buffer is read
    return buf, meta, alias


def _load_tensor(buf, meta):
    import torch
    dtype, shape, requires_grad, is_param, pinned = meta
    t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
    if pinned and torch.cuda.is_available():
        t = t.pin_memory()  # a pinned argument arrives pinned (a copy into page-locked memory)
    return _as_sent(t, requires_grad, is_param)


def _as_sent(t: Any, requires_grad: bool, is_param: bool) -> Any:
    import torch
    if is_param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(requires_grad) if requires_grad else t


shm.register("torch", _is_plain_cpu_tensor, _dump_tensor, _load_tensor)


def _is_cuda_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.is_cuda


def _cuda_handle(t: Any) -> tuple:
    """A CUDA tensor travels as a CUDA IPC handle to its memory, as torch.multiprocessing sends
    it (its reduction also keeps the memory alive until every rank let go). Detached first: torch
    refuses to share a non-leaf that requires grad; the flags travel beside it."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild, args = reduce_tensor(t.detach())
    return rebuild, args, t.requires_grad, type(t) is torch.nn.Parameter


def _open_cuda(handle: tuple) -> Any:
    """In a rank: open the caller's memory and copy it, on the same device, into the rank's own:
    the semantics of any other argument (a copy), and nothing of the caller's memory stays
    mapped in the rank once the copy is made."""
    rebuild, args, requires_grad, is_param = handle
    shared = rebuild(*args)
    own = shared.clone()
    del shared
    return _as_sent(own, requires_grad, is_param)


shm.register_handle("torch-cuda", _is_cuda_tensor, _cuda_handle, _open_cuda)

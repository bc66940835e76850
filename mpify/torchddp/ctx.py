"""PyTorch DDP in every rank: TorchDDPCtx, torchddp_launch, in_torchddp (the user API).

torch is imported only when used, so `import mpify` stays light. The TCPStore a launch hosts
for its ranks lives in store.py, and the tensor codec for shared memory and CUDA IPC in
codec.py: the engine (a launch, a world) needs those but not this API.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from datetime import timedelta
from typing import Any, Callable

from mpify.engine import rendezvous
from mpify.engine.rank import frameworks
from mpify.engine.rank.child import enter_ctx
from mpify.engine.world import world
from mpify.engine.launch.ranch import ranch
from mpify.torchddp.store import DEFAULT_TIMEOUT


def pick_backend(use_gpu: bool = True) -> str:
    """"nccl" when CUDA is usable and every local rank has its own GPU, else "gloo"."""
    import torch

    if use_gpu and torch.cuda.is_available() and torch.distributed.is_nccl_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.device_count() >= local_world:
            return "nccl"
    return "gloo"


class TorchDDPCtx:
    """Set up torch.distributed around fn in each rank, and tear it down even when fn raised.

    Reads the rank layout from the environment that ranch (or torchrun) set: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Outside such a launch, `base_rank`, `world_size`,
    `addr` and `port` fill in what is missing (the original mpify's keywords). `backend` forces
    "gloo" or "nccl"; `timeout` (seconds) bounds init and collectives; `num_threads` sets torch's
    intra-op threads for the duration (restored afterwards, which matters in the notebook rank).
    """

    mpify_hosts_store = True  # tells ranch to host torch's TCPStore for the ranks

    def __init__(self, *args: Any, world_size: int | None = None, base_rank: int = 0, use_gpu: bool = True,
                 addr: str | None = None, port: int | None = None, num_threads: int | None = 1,
                 backend: str | None = None, timeout: float | None = None, **kwargs: Any):
        if backend not in (None, "gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl' (or None to choose), got {backend!r}")
        self.world_size = world_size
        self.base_rank = base_rank
        self.use_gpu = use_gpu
        self.addr = addr
        self.port = port
        self.num_threads = num_threads
        self.backend = backend
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self.init_kwargs = kwargs  # passed on to init_process_group
        self._saved: list = []

    def __enter__(self) -> "TorchDDPCtx":
        import torch
        import torch.distributed as dist

        env_before = dict(os.environ)
        defaults = {"MASTER_ADDR": self.addr or rendezvous.DEFAULT_ADDR, "MASTER_PORT": str(self.port or 29500),
                    "RANK": str(self.base_rank + int(os.environ.get("LOCAL_RANK", "0"))),
                    "WORLD_SIZE": str(self.world_size or 1), "LOCAL_RANK": "0"}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        self._saved = [env_before, torch.get_num_threads(), None]
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        backend = self.backend or pick_backend(self.use_gpu)
        if backend == "nccl" or (self.use_gpu and torch.cuda.is_available()
                                 and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
            self._saved[2] = torch.cuda.current_device()
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if dist.is_initialized():  # left over from an earlier launch that was killed mid-teardown
            dist.destroy_process_group()
        try:
            dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=self.timeout),
                                    **self.init_kwargs)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            # The group is gone: what frameworks keep about it goes too, here as well as at the
            # launch's end, for a TorchDDPCtx used on its own (`with TorchDDPCtx():` twice in a
            # script): accelerate's state would otherwise still describe the first group.
            frameworks.reset()
            self._restore()

    def _restore(self) -> None:
        import torch

        from mpify.engine.env import restore_environ

        env_before, threads, device = self._saved
        restore_environ(env_before)
        torch.set_num_threads(threads)
        if device is not None:
            torch.cuda.set_device(device)


def _ddp_ctx(ctx: Any, ddp: TorchDDPCtx) -> Any:
    """TorchDDPCtx, with the user's own ctx (if any) entered inside it."""
    if ctx is None:
        return ddp
    return _Nested(ddp, ctx)


class _Nested:
    mpify_hosts_store = True

    def __init__(self, outer: Any, inner: Any):
        self.outer, self.inner = outer, inner
        self._stack: ExitStack | None = None

    def __enter__(self):
        with ExitStack() as stack:
            stack.enter_context(enter_ctx(self.outer))
            value = stack.enter_context(enter_ctx(self.inner))
            self._stack = stack.pop_all()
        return value

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)


def torchddp_launch(nprocs: int, fn: Callable, *args: Any, ctx: Any = None, **kwargs: Any) -> Any:
    """`ranch(nprocs, fn, *args, ctx=TorchDDPCtx(), **kwargs)`: fn runs inside an initialised
    default process group on every rank (gloo on CPU, nccl with one GPU per rank)."""
    return ranch(nprocs, fn, *args, ctx=_ddp_ctx(ctx, TorchDDPCtx()), **kwargs)


def in_torchddp(nprocs: int, fn: Callable, *args: Any, world_size: int | None = None, base_rank: int = 0,
                ctx: Any = None, use_gpu: bool = True, need: str = "", imports: str = "", **kwargs: Any) -> Any:
    """The original mpify's name and keywords: `world_size`/`base_rank` describe several nodes
    of `nprocs` ranks each (base_rank = node_rank * nprocs). Returns the gathered list of this
    node's results, as the original did."""
    world_size = world_size or nprocs
    if world_size % nprocs or base_rank % nprocs:
        raise ValueError(f"world_size ({world_size}) and base_rank ({base_rank}) must be multiples of nprocs ({nprocs})")
    kwargs.setdefault("gather", True)
    return ranch(nprocs, fn, *args, ctx=_ddp_ctx(ctx, TorchDDPCtx(use_gpu=use_gpu)), nnodes=world_size // nprocs,
                 node_rank=base_rank // nprocs, need=need, imports=imports, **kwargs)


def _world_ddp_ctx(ctx: Any, backend: str | None) -> Any:
    """What `World(..., ddp=True, backend=...)` enters in every rank."""
    return _ddp_ctx(ctx, TorchDDPCtx(backend=backend))


world.register_ddp(_world_ddp_ctx)

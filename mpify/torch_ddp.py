"""PyTorch DDP in every rank: TorchDDPCtx, torchddp_launch, in_torchddp.

The only module that imports torch, and only when used, so `import mpify` stays light. It also
hosts torch.distributed's own TCPStore for the engine's launches (see engine/rendezvous.py):
that is how a caller blocked as rank 0 in `init_process_group` learns of a dead rank at once.
"""
from __future__ import annotations

import ctypes
import os
import sys
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Any, Callable

from mpify.engine import rendezvous, shm
from mpify.engine.child import enter_ctx
from mpify.engine.launch import ranch

DEFAULT_TIMEOUT = 1800.0  # seconds, torch's own default for init_process_group and collectives


def _port_in_use(port: int) -> rendezvous.PortInUseError:
    return rendezvous.PortInUseError(f"master port {port} is already in use on this machine; pick another "
                                     f"port, or leave MASTER_PORT unset to get a free one")


def _host_store(addr: str, port: int, world_size: int) -> tuple[Any, int]:
    """Host a TCPStore server on `port` (0: a free one) for the ranks to join as clients.

    TCPStore's own server listens on every interface; the socket is bound here instead, to
    `addr` only (127.0.0.1 for a one-machine launch, as `torchrun --standalone` does), and
    handed to the store. An address that is not this machine's (behind NAT) falls back to
    torch's way."""
    import errno
    import socket

    import torch.distributed as dist

    listen_fd = None
    try:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        listen_fd = sock.detach()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _port_in_use(port) from None
        if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and not isinstance(exc, socket.gaierror):
            raise
    try:
        store = dist.TCPStore(addr, port, None, True, timeout=timedelta(seconds=DEFAULT_TIMEOUT),
                              wait_for_workers=False, master_listen_fd=listen_fd)
    except dist.DistNetworkError as exc:
        if listen_fd is not None:
            os.close(listen_fd)
        if "EADDRINUSE" in str(exc) or "in use" in str(exc):
            raise _port_in_use(port) from None
        raise
    return store, store.port


@contextmanager
def _destroy_leftover_group():
    import torch.distributed as dist

    if not dist.is_available():
        yield
        return
    world = dist.distributed_c10d._world
    was = dist.is_initialized()
    count = getattr(world, "group_count", None)
    try:
        yield
    finally:
        if not was and dist.is_initialized():
            dist.destroy_process_group()
        elif not was and count is not None:
            # torch names process groups by a per-process counter that a failed
            # init_process_group has already bumped; fresh ranks count from 0, so a caller whose
            # init failed once would wait forever for keys no rank writes on the next launch.
            world.group_count = count


rendezvous.register_torch_hooks(_host_store, _destroy_leftover_group)


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
    # launches as a snapshot, see engine/resident.py).
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

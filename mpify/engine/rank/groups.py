"""Process groups belong to the launch, whoever created them (TorchDDPCtx, or fn torchrun-style).

Why this exists: a DDP model's C++ Reducer holds a reference to its process group. When fn
returns, its DDP model is freed with the GIL held; if the Reducer held the group's last reference,
`~ProcessGroupGloo` joins gloo's worker threads right there, GIL still held, while a worker may be
finishing a work item whose destructor needs the GIL (`~ThreadLocalState` drops a SafePyObject):
the rank freezes for good, the notebook kernel with it (torch issue 56297 is the same family).

So, in every rank, for the length of fn (`launch_scope`):
- every process group created is recorded, which keeps a Python reference to it: freeing fn's DDP
  then never drops the last one;
- DDP models built are recorded by weak reference;
and when fn is over:
- a default group fn left initialised is destroyed;
- unreachable cycles are collected while those references still hold the groups;
- every DDP model still alive whose group belonged to the launch lets go of its Reducer (its group
  is destroyed, so it could not run another step anyway; `.module` and its weights stay usable);
- torch.distributed.nn.functional's default arguments are un-pinned (see `_unpin_defaults`);
- the references are dropped. torch binds ProcessGroup with a holder that releases the GIL
  before destroying the C++ object, so the join happens with the GIL free and gloo's workers
  finish. Nothing the launch started stays alive: no gloo loop, no store thread.

This module never imports torch: it acts only where the process has imported torch.distributed.
"""
from __future__ import annotations

import gc
import importlib.abc
import sys
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# Modules whose import, when it happens while a group exists, pins that group for good. Importing
# them before any group exists (as the first group registers, and in the forkserver) avoids it.
IMPORT_EARLY = ("torch.distributed.nn.functional",)
# sys.getrefcount(pg) inside `any(... for pg in self.groups)`: the list, the loop variable, the
# call's argument. More means somebody else holds the group.
_OURS_ONLY = 3


def _distributed() -> Any:
    """torch.distributed's c10d module if this process has torch.distributed, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return None
    return sys.modules.get("torch.distributed.distributed_c10d")


class _Owner:
    """What one launch scope recorded, and the patches that record it."""

    def __init__(self, c10d: Any):
        self.c10d = c10d
        self.groups: list = []
        self.models: list[weakref.ref] = []
        self._register = c10d._register_process_group
        self._ddp = sys.modules.get("torch.nn.parallel.distributed")
        self._ddp_init = None

    def install(self) -> None:
        register = self._register

        def recording_register(name: str, pg: Any) -> Any:
            # Before the first group becomes group.WORLD (init_process_group sets it after this
            # call): a module whose import would pin it is imported now, pinning nothing.
            _import_early()
            self.groups.append(pg)
            return register(name, pg)

        # distributed_c10d calls this module global for every group it creates (the default
        # group and new_group's alike), so it is resolved at call time and can be wrapped.
        self.c10d._register_process_group = recording_register
        if self._ddp is not None:
            cls = self._ddp.DistributedDataParallel
            original = cls.__dict__["__init__"]

            def recording_init(model: Any, *args: Any, **kwargs: Any) -> None:
                self.models.append(weakref.ref(model))
                original(model, *args, **kwargs)

            self._ddp_init = original
            cls.__init__ = recording_init

    def uninstall(self) -> None:
        self.c10d._register_process_group = self._register
        if self._ddp_init is not None:
            self._ddp.DistributedDataParallel.__init__ = self._ddp_init
            self._ddp_init = None

    def release(self) -> None:
        c10d = self.c10d
        if c10d.is_initialized() and c10d._world.default_pg in self.groups:
            try:
                c10d.destroy_process_group()
            except Exception:  # a half-broken group still has to go; its references are dropped below
                pass
        if not self.groups:
            return
        ours = {id(pg) for pg in self.groups}
        self._unhook_models(ours)
        _unpin_defaults(ours)
        if any(sys.getrefcount(pg) > _OURS_ONLY for pg in self.groups):
            # Still held: by a DDP model in an unreachable cycle, or by the user (a global, a
            # returned model, a traceback). A full collection costs ~0.1 s in a process holding
            # torch._dynamo, so it runs only then.
            gc.collect()
            self._unhook_models(ours)
        # The last Python references: each dealloc releases the GIL before ~ProcessGroup.
        self.groups.clear()
        self.models.clear()

    def release_destroyed(self) -> bool:
        """Let go of the groups destroyed since they were made (by fn, a framework's own
        teardown), as `release` does at the scope's end (see `release_destroyed` below); whether
        there were any."""
        live = getattr(getattr(self.c10d, "_world", None), "pg_map", None)
        if live is None:
            return False
        gone = [pg for pg in self.groups if pg not in live]
        if not gone:
            return False
        self.groups = [pg for pg in self.groups if pg in live]
        ours = {id(pg) for pg in gone}
        self._unhook_models(ours)
        _unpin_defaults(ours)
        if any(sys.getrefcount(pg) > _OURS_ONLY for pg in gone):
            gc.collect()
            self._unhook_models(ours)
        gone.clear()  # the last references, as in release
        return True

    def _unhook_models(self, ours: set[int]) -> None:
        for ref in self.models:
            model = ref()
            if model is not None and id(getattr(model, "process_group", None)) in ours:
                # The Reducer holds the group (and autograd hooks on the parameters); the model's
                # Python object may outlive the launch (returned, global, in a traceback).
                for attr in ("reducer", "logger", "process_group"):
                    if attr in model.__dict__:
                        model.__dict__[attr] = None


def _unpin_defaults(ours: set[int]) -> None:
    """torch.distributed.nn.functional writes `group=group.WORLD` as default arguments, evaluated
    once, at import: imported while a group exists (DDP's constructor imports it), ten functions
    keep that group alive forever, with its gloo threads. Put back the None they would hold had
    the module been imported with no group."""
    module = sys.modules.get("torch.distributed.nn.functional")
    if module is None:
        return
    for value in list(vars(module).values()):
        defaults = getattr(value, "__defaults__", None)
        if defaults and any(id(d) in ours for d in defaults):
            value.__defaults__ = tuple(None if id(d) in ours else d for d in defaults)


def _import_early() -> None:
    """Import the modules that would pin a group if first imported during fn."""
    if _distributed() is None:
        return
    for name in IMPORT_EARLY:
        try:
            __import__(name)
        except Exception:  # not in this torch version: nothing to pin
            pass


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then()` right after the module `name` has been imported (executed), if that
    happens while this finder is on sys.meta_path: fn may import torch itself when the caller
    had not, and its groups must belong to the launch all the same."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:  # the finder that would have found it, without this one
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, then = spec.loader, self.then

        class Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                then()

        spec.loader = Loader()
        return spec


# `import torch` imports torch.distributed, then this; once it ran, groups can be recorded.
_TORCH_READY = "torch.nn.parallel.distributed"


_owners: list[_Owner] = []  # the scopes open in this process, innermost last


def release_destroyed() -> bool:
    """Between a live world's cells, in each of its ranks: the groups a cell destroyed are let go
    of now, not when the world closes. A destroyed group that something still holds (fn's DDP model
    in a cycle of a framework's objects, ignite's Engine and its handlers) keeps its rendezvous
    store listening on the world's MASTER_PORT; the next cell's `init_process_group` then made a
    second store on that port, and a rank that reached the old one waited for good (ignite's
    `idist.Parallel` in a second training cell, seen in a kernel). Whether any was: the world
    then has the next group meet at a new store (World._meet_anew)."""
    return bool(_owners) and _owners[-1].release_destroyed()


@contextmanager
def launch_scope() -> Iterator[None]:
    """Around ctx + fn in one rank: the groups created inside belong to the launch (see above)."""
    owner: _Owner | None = None

    def adopt() -> None:
        nonlocal owner
        c10d = _distributed()
        if owner is None and c10d is not None and hasattr(c10d, "_register_process_group"):
            owner = _Owner(c10d)
            owner.install()
            _owners.append(owner)

    adopt()
    watcher = None
    if owner is None and _TORCH_READY not in sys.modules:
        watcher = _AfterImport(_TORCH_READY, adopt)
        sys.meta_path.insert(0, watcher)
    try:
        yield
    finally:
        if watcher is not None and watcher in sys.meta_path:
            sys.meta_path.remove(watcher)
        if owner is not None:
            owner.uninstall()
            if owner in _owners:
                _owners.remove(owner)
            owner.release()

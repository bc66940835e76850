"""Large arrays and tensors travel to the ranks through shared memory, not N pickles.

Pickling a 256 MB array into the launch would push 256 MB through a pipe to every rank. Instead
the caller puts each large buffer once into a shared-memory file and pickles a small reference;
each rank maps that file copy-on-write (MAP_PRIVATE): no copy until a rank writes, and a rank's
writes stay its own, exactly as with a pickled copy.

The file is a memfd that ranks open as /proc/<caller>/fd/<n>: it never shows in /dev/shm and the
kernel frees it when the last holder exits, however the caller and ranks end. A buffer whose owner
lives on across launches keeps its memfd as a snapshot that the next launch refreshes page by page
(resident.py); any other buffer's memfd is closed when the launch ends. Where memfds cannot be
shared that way (not Linux, or a caller that is not dumpable, so /proc/<pid>/fd is closed to its
ranks), the file goes to /dev/shm instead, removed when the launch ends; files left by a caller
that was killed are removed by the next launch (their names carry the dead caller's pid).

numpy is handled here; torch tensors by kinds that mpify.torchddp.codec registers, so that the
engine never imports torch itself.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import itertools
import mmap
import os
import sys
import tempfile
import threading
from typing import Any, Callable

from mpify.engine.args.resident import copy_pages, resident

THRESHOLD = 1 << 20  # bytes; smaller buffers are cheaper to pickle than to map
PREFIX = "mpify-shm-"

# name -> (match(obj) -> bool, dump(obj) -> (buffer, meta, alias), load(buffer, meta) -> obj).
# alias is (owner, address) when the buffer is the object's own memory, owner being the object
# that owns that memory (a base ndarray, a torch storage); None when dump had to copy.
_kinds: dict[str, tuple[Callable, Callable, Callable]] = {}
_launches = itertools.count()
last_launch = {"shared": 0, "copied": 0}  # bytes, for benchmarks/ and tests


def _key(name: str, load: Callable) -> str:
    # The kind travels as "module:name", the module being the one that registered it: a rank
    # that has not imported it yet (the engine never imports torchddp/codec.py, and `import mpify`
    # loads its rooms lazily) imports it before loading the buffer (see _provided).
    return f"{load.__module__}:{name}"


def _provided(registry: dict, key: str) -> tuple:
    if key not in registry:
        importlib.import_module(key.partition(":")[0])  # registers the kind as it is imported
    return registry[key]


def register(name: str, match: Callable[[Any], bool], dump: Callable, load: Callable) -> None:
    _kinds[_key(name, load)] = (match, dump, load)


# name -> (match(obj) -> bool, handle(obj) -> picklable handle, open(handle) -> obj): objects
# that travel as a handle the ranks open themselves, not as bytes (CUDA tensors: an IPC handle).
# The caller keeps the object alive for the launch (it is one of the launch's arguments).
_handles: dict[str, tuple[Callable, Callable, Callable]] = {}


def register_handle(name: str, match: Callable[[Any], bool], handle: Callable, open_: Callable) -> None:
    _handles[_key(name, open_)] = (match, handle, open_)


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


_memfd_ok: bool | None = None


def memfd_shareable() -> bool:
    """Can ranks open this process's memfds through /proc/<pid>/fd? (Linux, and the caller is
    dumpable: /proc/<pid>/fd of a non-dumpable process is closed even to its own user.)"""
    global _memfd_ok
    if _memfd_ok is None:
        _memfd_ok = False
        if sys.platform.startswith("linux") and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _memfd_ok = libc.prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
            except (OSError, AttributeError):
                pass
    return _memfd_ok


def sweep_stale() -> None:
    """Remove /dev/shm files of callers that no longer run (a caller killed with SIGKILL cannot)."""
    for path in glob.glob(os.path.join(_shm_dir(), PREFIX + "*")):
        try:
            pid = int(os.path.basename(path)[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except (ValueError, PermissionError):
            pass


class ShmWriter:
    """Used while pickling one launch in the caller; owns what it puts in shared memory."""

    def __init__(self):
        self.launch = next(_launches)
        self.paths: list[str] = []  # /dev/shm files, removed at cleanup
        self.fds: list[int] = []  # this launch's own memfds, closed at cleanup
        self._seen: dict[int, tuple] = {}  # one file per object, however often it is referenced
        self._writers: list[threading.Thread] = []
        self._keep: list[Any] = []  # the objects whose memory the writer threads read
        self._keep_alive: list[Any] = []  # objects sent as handles: alive until the launch ends
        self.shared = self.copied = 0
        self._count_lock = threading.Lock()
        self._errors: list[OSError] = []

    def finish(self) -> None:
        """Wait until every buffer is in shared memory; raise the first copy's OSError."""
        for writer in self._writers:
            writer.join()
        self._writers.clear()
        self._keep.clear()
        if self._errors:
            raise self._errors[0]

    def persistent_id(self, obj: Any):
        if id(obj) in self._seen:
            return self._seen[id(obj)]
        for name, (match, handle, _) in _handles.items():
            if match(obj):
                self._keep_alive.append(obj)
                pid = self._seen[id(obj)] = ("mpify-handle", name, handle(obj))
                return pid
        for name, (match, dump, _) in _kinds.items():
            if match(obj):
                buf, meta, alias = dump(obj)  # match() said it is large enough to be worth it
                view = memoryview(buf).cast("B")
                path, offset = self._place(view, alias)
                self._keep.append((obj, buf))
                self.shared += view.nbytes
                pid = self._seen[id(obj)] = ("mpify-shm", name, path, offset, view.nbytes, meta)
                return pid
        return None

    def _place(self, view: memoryview, alias: tuple | None) -> tuple[str, int]:
        # Copies run in threads (pwrite releases the GIL) while pickling goes on; `finish` waits
        # for them before any rank starts.
        if memfd_shareable():
            if alias is not None:
                owner, addr = alias
                placed = resident.place(owner, addr, view.nbytes, self.launch)
                if placed is not None:
                    fd, offset, ranges = placed
                    self._copy(copy_pages, fd, ranges)
                    return f"/proc/{os.getpid()}/fd/{fd}", offset
            fd = os.memfd_create("mpify-arg", os.MFD_CLOEXEC)
            self.fds.append(fd)
            self._copy(_write_all, fd, view)
            return f"/proc/{os.getpid()}/fd/{fd}", 0
        fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=_shm_dir())
        self.paths.append(path)
        self._copy(_write_all, fd, view, True)
        return path, 0

    def _copy(self, write: Callable, *args) -> None:
        thread = threading.Thread(target=self._count, args=(write, args), name="mpify-shm-write")
        thread.start()
        self._writers.append(thread)

    def _count(self, write: Callable, args: tuple) -> None:
        try:
            n = write(*args)
        except OSError as exc:  # ENOSPC in a full /dev/shm, ENOMEM: reported by `finish`
            self._errors.append(exc)
            return
        with self._count_lock:
            self.copied += n

    def cleanup(self) -> None:
        try:
            self.finish()
        except OSError:  # reported already, by dumps_launch
            pass
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()
        resident.done(self.launch)
        self._keep_alive.clear()
        last_launch.update(shared=self.shared, copied=self.copied)


def _write_all(fd: int, view: memoryview, close: bool = False) -> int:
    try:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], done)
        return done
    finally:
        if close:
            os.close(fd)


def release() -> None:
    """Free every snapshot kept between launches (mpify.shutdown)."""
    resident.clear()


def persistent_load(pid: Any) -> Any:
    """In a rank: map the file copy-on-write and rebuild the object on top of the mapping (or
    open the handle it travelled as)."""
    if pid[0] == "mpify-handle":
        _, name, handle = pid
        return _provided(_handles, name)[2](handle)
    tag, name, path, offset, nbytes, meta = pid
    if tag != "mpify-shm":
        raise ValueError(f"unknown persistent id {tag!r}")
    fd = os.open(path, os.O_RDONLY)
    try:
        skip = offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, skip + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=offset - skip)
    finally:
        os.close(fd)
    buf = memoryview(mapping)[skip:skip + nbytes] if skip else mapping
    return _provided(_kinds, name)[2](buf, meta)


# ---- numpy ------------------------------------------------------------------------------
def _is_ndarray(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    # Exactly ndarray: subclasses (masked arrays, matrices) carry more state than the buffer.
    # np.memmap is the exception: its state is an open file that cannot travel, and a rank
    # wants its data, so it travels as a plain ndarray copy.
    if np is None or obj.__class__ is not np.ndarray and not isinstance(obj, np.memmap):
        return False
    return not obj.dtype.hasobject and (obj.nbytes >= THRESHOLD or isinstance(obj, np.memmap) and obj.nbytes > 0)


def _dump_ndarray(arr):
    import numpy as np
    flat = np.ascontiguousarray(arr)
    alias = None
    if flat is arr and type(arr) is np.ndarray:  # no copy: the buffer is arr's own memory, owned by the root of its bases
        owner = arr
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        alias = (owner, arr.ctypes.data)
    return flat, (flat.dtype, flat.shape), alias


def _load_ndarray(buf, meta):
    import numpy as np
    dtype, shape = meta
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


register("numpy", _is_ndarray, _dump_ndarray, _load_ndarray)

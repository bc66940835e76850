"""Large arrays and tensors travel to the ranks through one file in /dev/shm, not N pickles.

Pickling a 256 MB array into the launch would push 256 MB through a pipe to every rank. Instead
the caller writes each large buffer once to a file in shared memory and pickles a small
reference; each rank maps that file copy-on-write (MAP_PRIVATE): no copy until a rank writes,
and a rank's writes stay its own, exactly as with a pickled copy. The caller removes the files
when the launch ends, whatever happened to the ranks; files left by a caller that was killed
are removed by the next launch (their names carry the dead caller's pid).

numpy is handled here; torch tensors by a kind that mpify.torch_ddp registers, so that the
engine never imports torch itself.
"""
from __future__ import annotations

import glob
import mmap
import os
import sys
import tempfile
import threading
from typing import Any, Callable

THRESHOLD = 1 << 20  # bytes; smaller buffers are cheaper to pickle than to map
PREFIX = "mpify-shm-"

# name -> (match(obj) -> bool, dump(obj) -> (buffer, meta), load(buffer, meta) -> obj)
_kinds: dict[str, tuple[Callable, Callable, Callable]] = {}


def register(name: str, match: Callable[[Any], bool], dump: Callable, load: Callable) -> None:
    _kinds[name] = (match, dump, load)


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def sweep_stale() -> None:
    """Remove files of callers that no longer run (a caller killed with SIGKILL cannot)."""
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
    """Used while pickling one launch in the caller; owns the files it writes."""

    def __init__(self):
        self.paths: list[str] = []
        self._seen: dict[int, tuple] = {}  # one file per object, however often it is referenced
        self._writers: list[threading.Thread] = []

    def finish(self) -> None:
        """Wait until every buffer is in shared memory."""
        for writer in self._writers:
            writer.join()
        self._writers.clear()

    def persistent_id(self, obj: Any):
        if id(obj) in self._seen:
            return self._seen[id(obj)]
        for name, (match, dump, _) in _kinds.items():
            if match(obj):
                buf, meta = dump(obj)
                view = memoryview(buf).cast("B")
                if view.nbytes < THRESHOLD:
                    return None
                fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=_shm_dir())
                self.paths.append(path)
                # Buffers are written in parallel threads (the copy releases the GIL) while
                # pickling goes on; `finish` waits for them before any rank starts.
                writer = threading.Thread(target=_write, args=(fd, view), name="mpify-shm-write")
                writer.start()
                self._writers.append(writer)
                pid = self._seen[id(obj)] = ("mpify-shm", name, path, view.nbytes, meta)
                return pid
        return None

    def cleanup(self) -> None:
        self.finish()
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()


def _write(fd: int, view: memoryview) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(view)


def persistent_load(pid: Any) -> Any:
    """In a rank: map the file copy-on-write and rebuild the object on top of the mapping."""
    tag, name, path, nbytes, meta = pid
    if tag != "mpify-shm":
        raise ValueError(f"unknown persistent id {tag!r}")
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return _kinds[name][2](mapping, meta)


# ---- numpy ------------------------------------------------------------------------------
def _is_ndarray(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    # Exactly ndarray: subclasses (masked arrays, matrices) carry more state than the buffer.
    return np is not None and type(obj) is np.ndarray and not obj.dtype.hasobject


def _dump_ndarray(arr):
    import numpy as np
    arr = np.ascontiguousarray(arr)
    return arr, (arr.dtype, arr.shape)


def _load_ndarray(buf, meta):
    import numpy as np
    dtype, shape = meta
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


register("numpy", _is_ndarray, _dump_ndarray, _load_ndarray)

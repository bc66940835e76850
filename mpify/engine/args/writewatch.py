"""Which pages of the caller's memory were written since we last looked (Linux 6.7+).

Why: a notebook passes the same big argument (a dataset, a model's weights) to launch after
launch. Copying it into shared memory every time costs ~0.07 s per 256 MB; knowing which pages
changed since the last launch lets mpify copy only those, usually none.

How: the buffer's pages are registered with a userfaultfd in write-protect mode with
UFFD_FEATURE_WP_ASYNC, so the kernel resolves each write fault itself (no handler thread, no
signal) and the written page simply loses its protection. The PAGEMAP_SCAN ioctl with
PM_SCAN_WP_MATCHING lists the pages that lost it and protects them again in the same page-table
walk, so a write that lands while we look is never lost: it shows up in this scan or the next.
Writes the kernel makes on the process's behalf (``read()`` into the buffer, another process's
``process_vm_writev``, pinned DMA) fault the same way. Writes through another mapping of the same
memory do not, so `watchable` admits only private anonymous memory.

Where any of this is missing (older kernels, other systems, a sandbox that forbids
userfaultfd), `WriteWatch.open()` returns None and mpify copies every launch, as before.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

PAGE = mmap.PAGESIZE


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


def _ior(kind: int, nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | nr


# From linux/userfaultfd.h and linux/fs.h (x86_64 and aarch64 share these numbers).
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine) if hasattr(os, "uname") else None
_UFFD_USER_MODE_ONLY = 1  # lets an unprivileged process in when vm.unprivileged_userfaultfd=0
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # protect pages never touched yet (calloc'd zeros)
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_API = _iowr(0xAA, 0x3F, 24)
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
_UFFDIO_UNREGISTER = _ior(0xAA, 0x01, 16)
_UFFDIO_REGISTER_MODE_WP = 2
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_PAGEMAP_SCAN = _iowr(0x66, 16, 96)
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail with EPERM on a page that is not watched
_PAGE_IS_WRITTEN = 1 << 1
_VEC = 256  # regions returned per ioctl; the walk resumes where it stopped


class NotWatched(Exception):
    """The range is no longer (entirely) watched: it was unmapped and mapped again."""


def page_range(addr: int, nbytes: int) -> tuple[int, int]:
    """The pages that hold [addr, addr + nbytes)."""
    return addr // PAGE * PAGE, -(-(addr + nbytes) // PAGE) * PAGE


def watchable(start: int, end: int) -> bool:
    """True if [start, end) lies in private anonymous memory (heap or anonymous mmap).

    File-backed and shared mappings can change through another mapping of the same pages, which
    no write-protect in this process sees, so they are never watched."""
    try:
        with open("/proc/self/maps") as maps:
            covered = start
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi <= covered or lo >= end:
                    continue
                if lo > covered:  # a hole: unmapped pages
                    return False
                path = fields[5].strip() if len(fields) > 5 else ""
                if fields[1][3] != "p" or fields[4] != "0" or not (path in ("", "[heap]") or path.startswith("[anon:")):
                    return False
                covered = hi
                if covered >= end:
                    return True
    except OSError:
        return False
    return False


class WriteWatch:
    """One userfaultfd of this process and the pagemap file that reads its marks."""

    def __init__(self, uffd: int, pagemap: int):
        self._uffd = uffd
        self._pagemap = pagemap
        self._libc = _libc()
        self._vec = (ctypes.c_uint64 * (3 * _VEC))()

    @classmethod
    def open(cls) -> "WriteWatch | None":
        if not sys.platform.startswith("linux") or _SYS_USERFAULTFD is None:
            return None
        libc = _libc()
        uffd = libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
        if uffd < 0:  # ENOSYS, EPERM (seccomp, sysctl): not here
            return None
        pagemap = -1
        try:
            want = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
            api = (ctypes.c_uint64 * 3)(_UFFD_API, want, 0)
            if libc.ioctl(uffd, _UFFDIO_API, ctypes.addressof(api)) < 0 or api[1] & want != want:
                raise OSError("userfaultfd without async write-protect")
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            watch = cls(uffd, pagemap)
            if not watch._self_test():  # PAGEMAP_SCAN is newer than WP_ASYNC in some backports
                raise OSError("PAGEMAP_SCAN does not see writes")
            return watch
        except OSError:
            os.close(uffd)
            if pagemap >= 0:
                os.close(pagemap)
            return None

    def _self_test(self) -> bool:
        """Watch two fresh pages, write one: exactly that one must be reported."""
        probe = mmap.mmap(-1, 2 * PAGE)
        view = ctypes.c_char.from_buffer(probe)
        start = ctypes.addressof(view)
        del view  # an exported pointer would keep the mapping from closing
        try:
            self.watch(start, start + 2 * PAGE)
            clean = self.written(start, start + 2 * PAGE)
            probe[PAGE] = 1
            dirty = self.written(start, start + 2 * PAGE)
            self.unwatch(start, start + 2 * PAGE)
            return clean == [] and dirty == [(start + PAGE, start + 2 * PAGE)]
        except (OSError, NotWatched):
            return False
        finally:
            probe.close()

    def watch(self, start: int, end: int) -> None:
        """Register [start, end) (page-aligned) and protect every page of it. Copy the pages
        after this call: a write that races the copy is then reported by the next `written`."""
        reg = (ctypes.c_uint64 * 4)(start, end - start, _UFFDIO_REGISTER_MODE_WP, 0)
        self._check(self._libc.ioctl(self._uffd, _UFFDIO_REGISTER, ctypes.addressof(reg)))
        protect = (ctypes.c_uint64 * 3)(start, end - start, _UFFDIO_WRITEPROTECT_MODE_WP)
        self._check(self._libc.ioctl(self._uffd, _UFFDIO_WRITEPROTECT, ctypes.addressof(protect)))

    def unwatch(self, start: int, end: int) -> None:
        rng = (ctypes.c_uint64 * 2)(start, end - start)
        # EINVAL/ENOMEM: the pages were unmapped already (the owner was freed); nothing to undo.
        self._libc.ioctl(self._uffd, _UFFDIO_UNREGISTER, ctypes.addressof(rng))

    def written(self, start: int, end: int) -> list[tuple[int, int]]:
        """The page ranges in [start, end) written since the last call, protected again."""
        out: list[tuple[int, int]] = []
        vec = self._vec
        at = start
        while at < end:
            arg = (ctypes.c_uint64 * 12)(96, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, at, end, 0,
                                          ctypes.addressof(vec), _VEC, 0, 0, _PAGE_IS_WRITTEN, 0,
                                          _PAGE_IS_WRITTEN)
            found = self._libc.ioctl(self._pagemap, _PAGEMAP_SCAN, ctypes.addressof(arg))
            if found < 0:
                err = ctypes.get_errno()
                if err in (errno.EPERM, errno.EINVAL, errno.ENOMEM):
                    raise NotWatched(os.strerror(err))
                raise OSError(err, os.strerror(err))
            for i in range(found):
                lo, hi = vec[3 * i], vec[3 * i + 1]
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
            if arg[4] <= at:  # no progress: should not happen, never loop forever
                raise NotWatched("PAGEMAP_SCAN made no progress")
            at = arg[4]  # walk_end
        return out

    def close(self) -> None:
        """Closing the userfaultfd unregisters every range it watches."""
        for fd in (self._uffd, self._pagemap):
            try:
                os.close(fd)
            except OSError:
                pass
        self._uffd = self._pagemap = -1

    def _check(self, ret: int) -> None:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        lib.ioctl.restype = ctypes.c_int
        _libc_handle = lib
    return _libc_handle

"""Snapshots of big arguments that stay in shared memory between launches.

Why: in a notebook the same dataset or model is passed to launch after launch. Each launch must
give the ranks a snapshot of it as it is at the call (a rank must not see rank 0's in-place
writes mid-run), and the only way to share a private buffer with another process is to copy it
into shared memory: ~0.07 s per 256 MB here, every launch. Keeping the snapshot between launches
and copying only the pages the caller wrote since the last one (`writewatch`) makes a warm launch
with 512 MB of arguments cost about what one without them does.

Rules that keep it safe:
- An entry belongs to one owner object (the numpy base array or torch storage that owns the
  memory) through a weak reference; when the owner dies the entry is dropped and its memory freed.
  A different owner at the same address is a new entry.
- Only private anonymous memory is watched; anything else is copied every launch.
- Pages shared by two entries (two views' edges, a tensor and a numpy array over the same memory)
  are handed to every entry that holds them whenever one entry's scan re-protects them.
- The snapshots are memfds: they never appear in /dev/shm, and the kernel frees them when the
  caller exits, even by SIGKILL.
- They cost memory while their owners live: at most `limit()` bytes (a quarter of RAM unless
  MPIFY_SHM_CACHE_MB says otherwise; 0 turns the cache off), least recently used evicted first.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from mpify.engine.args import writewatch
from mpify.engine.args.writewatch import NotWatched, page_range


def limit() -> int:
    """Bytes the snapshots may hold in all."""
    value = os.environ.get("MPIFY_SHM_CACHE_MB")
    if value is not None:
        try:
            return max(0, int(value)) << 20
        except ValueError:
            pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class Entry:
    start: int
    end: int
    owner: weakref.ref
    fd: int
    used: float = 0.0
    # Launches still running that gave it to their ranks. Their ranks map the memfd copy-on-write,
    # and a page they have not written follows the file: while any of them runs, the memfd is
    # never written, dropped or evicted (a nested launch copies for itself instead).
    launches: set = field(default_factory=set)
    pending: list = field(default_factory=list)  # pages to copy, handed over by other entries


class Resident:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], Entry] = {}
        self._dead: list[tuple[int, int]] = []
        self._watch: writewatch.WriteWatch | None = None
        self._opened = False

    # -- used by the launch, under its ShmWriter --------------------------------------------
    def place(self, owner: Any, addr: int, nbytes: int, launch: int) -> tuple[int, int, list] | None:
        """The snapshot of [addr, addr+nbytes) for this launch: (fd, offset of addr in it, page
        ranges to copy into it now). None: not kept here; copy it for this launch only."""
        if limit() <= 0:
            return None
        with self._lock:
            self._reap()
            watch = self._open_watch()
            if watch is None:
                return None
            start, end = page_range(addr, nbytes)
            key = (start, end)
            entry = self._entries.get(key)
            if entry is not None and entry.launches - {launch}:
                return None  # an outer launch's ranks map it: leave it as they got it
            if entry is not None and entry.owner() is not owner:
                self._drop(key)  # the old owner died and another one got its address
                entry = None
            dirty: list = []
            if entry is not None:
                try:
                    dirty = self._scan(entry)
                except NotWatched:  # the pages were unmapped and mapped anew: start over
                    self._drop(key)
                    entry = None
            if entry is None:
                entry = self._add(owner, start, end, launch)
                if entry is None:
                    return None
                dirty = [(start, end)]
            entry.used = time.monotonic()
            entry.launches.add(launch)
            return entry.fd, addr - start, [(lo - start, hi - lo, lo) for lo, hi in dirty]

    def done(self, launch: int) -> None:
        """After a launch, its ranks gone: release its entries, drop dead owners' entries and
        evict down to the limit."""
        with self._lock:
            for entry in self._entries.values():
                entry.launches.discard(launch)
            self._reap()
            self._evict(limit())

    def clear(self) -> None:
        """Free every snapshot that no running launch holds (mpify.shutdown)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if not entry.launches:
                    self._drop(key)
            self._dead.clear()
            if self._watch is not None and not self._entries:
                self._watch.close()
                self._watch, self._opened = None, False

    def held(self) -> int:
        """Bytes of snapshots kept now."""
        return sum(e.end - e.start for e in self._entries.values())

    # -- internals, under the lock ----------------------------------------------------------
    def _open_watch(self) -> writewatch.WriteWatch | None:
        if not self._opened:
            self._opened = True
            self._watch = writewatch.WriteWatch.open()
        return self._watch

    def _add(self, owner: Any, start: int, end: int, launch: int) -> Entry | None:
        size = end - start
        if size > limit() or not writewatch.watchable(start, end):
            return None
        self._evict(limit() - size)
        if self.held() + size > limit():
            return None
        try:
            ref = weakref.ref(owner, lambda _r, key=(start, end): self._forget(key))
        except TypeError:  # an owner that cannot be weakly referenced: no way to know it died
            return None
        fd = os.memfd_create("mpify-resident", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._watch.watch(start, end)
        except OSError:
            os.close(fd)
            return None
        for other in self._entries.values():  # `watch` re-protected their shared pages
            lo, hi = max(start, other.start), min(end, other.end)
            if lo < hi:
                other.pending.append((lo, hi))
        entry = self._entries[(start, end)] = Entry(start, end, ref, fd)
        return entry

    def _scan(self, entry: Entry) -> list:
        written = self._watch.written(entry.start, entry.end)
        for other in self._entries.values():
            if other is entry:
                continue
            for lo, hi in written:
                lo, hi = max(lo, other.start), min(hi, other.end)
                if lo < hi:
                    other.pending.append((lo, hi))
        dirty = _merge(entry.pending + written)
        entry.pending = []
        return dirty

    def _forget(self, key: tuple[int, int]) -> None:
        # Runs inside garbage collection, perhaps while this thread holds the lock: only note it,
        # and free right away when nobody is in the middle of a launch. At interpreter exit the
        # kernel frees it all, and the modules this needs may be gone already.
        if sys.is_finalizing():
            return
        self._dead.append(key)
        if self._lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._lock.release()

    def _reap(self) -> None:
        dead, self._dead = self._dead, []
        for key in dead:
            entry = self._entries.get(key)
            if entry is not None and entry.owner() is None:
                if entry.launches:  # not while a launch's ranks may still open it
                    self._dead.append(key)
                else:
                    self._drop(key)

    def _evict(self, room: int) -> None:
        """Drop the least recently used entries that no running launch holds until `room`."""
        for entry in sorted(self._entries.values(), key=lambda e: e.used):
            if self.held() <= room:
                return
            if not entry.launches:
                self._drop((entry.start, entry.end))

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        os.close(entry.fd)
        if self._watch is not None:
            # Unwatch only the pages no other entry still watches.
            for lo, hi in _subtract((entry.start, entry.end), [(e.start, e.end) for e in self._entries.values()]):
                self._watch.unwatch(lo, hi)

    def _after_fork_in_child(self) -> None:
        # The userfaultfd belongs to the parent's address space: a child must never use it.
        for entry in self._entries.values():
            try:
                os.close(entry.fd)
            except OSError:
                pass
        if self._watch is not None:
            self._watch.close()
        self.__init__()


def copy_pages(fd: int, ranges: list) -> int:
    """Copy (file offset, length, address) ranges of this process's memory into the snapshot."""
    copied = 0
    for offset, length, addr in ranges:
        view = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:], offset + done)
        copied += length
    return copied


def _merge(ranges: list) -> list:
    out: list = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(span: tuple[int, int], others: list) -> list:
    pieces = [span]
    for olo, ohi in others:
        nxt = []
        for lo, hi in pieces:
            if ohi <= lo or olo >= hi:
                nxt.append((lo, hi))
                continue
            if lo < olo:
                nxt.append((lo, olo))
            if ohi < hi:
                nxt.append((ohi, hi))
        pieces = nxt
    return pieces


resident = Resident()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=resident._after_fork_in_child)

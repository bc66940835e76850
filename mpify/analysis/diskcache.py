"""What the analyzer learnt from a library's source files, kept on disk between runs.

Why: `from fastai.vision.all import *` makes the analyzer read some sixty files of fastai,
fastcore and torch; parsing them took a quarter of a second in every `mpify export`, and the files
only change when the library is upgraded. Each file's entry is keyed by the file's path, size and
modification time, so an edited or reinstalled file is parsed again.

The store is one JSON file (JSON rather than pickle: loading it runs nothing) in the user's cache
directory: `$MPIFY_CACHE_DIR`, else `$XDG_CACHE_HOME/mpify`, else `~/.cache/mpify`.
`MPIFY_CACHE_DIR=off` (or `0`, or empty) turns it off. What is read from it is never trusted: a
file that does not parse, is of another version or has the wrong shape counts as empty, an entry
whose size or time differs from the file's is a miss, and the caller checks each value's shape
(`get` only hands out what `put` was given, as far as JSON can tell). Writes go to a temp file in
the same directory, then `os.replace`, so a reader never sees half a file; two processes writing
at once lose each other's new entries at worst, never the file. Any OSError disables the store
for the rest of the process, quietly: a cache must never make the analyzer fail.
"""
from __future__ import annotations

import json
import os

__all__ = ["ENV", "cache_dir", "DiskCache"]

ENV = "MPIFY_CACHE_DIR"
_OFF = {"", "0", "off", "none", "false", "no"}


def cache_dir() -> str | None:
    """The directory mpify caches in, or None when the user turned caching off."""
    own = os.environ.get(ENV)
    if own is not None:
        return None if own.strip().lower() in _OFF else os.path.expanduser(own)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpify")


class DiskCache:
    """One JSON file of entries `path -> [size, mtime_ns, value]`, loaded on first use.

    name: the file's name in the cache directory (the version goes in it, so a format change
    starts a new file rather than misreading the old one). limit: the most entries kept; the ones
    written longest ago go first (a notebook deleted long ago, a library version since upgraded)."""

    def __init__(self, name: str, limit: int = 4000):
        self.name = name
        self.limit = limit
        self._entries: dict | None = None
        self._file: str | None = None
        self._dirty = False

    def _load(self) -> dict:
        if self._entries is not None:
            return self._entries
        self._entries = {}
        d = cache_dir()
        if d is None:
            return self._entries
        self._file = os.path.join(d, self.name)
        try:
            with open(self._file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):  # absent, unreadable or corrupt: start empty
            return self._entries
        if isinstance(data, dict):
            self._entries = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, list)
                             and len(v) == 3 and type(v[0]) is int and type(v[1]) is int}
        return self._entries

    def get(self, path: str, size: int, mtime_ns: int):
        """The value stored for this version of the file (its size and mtime), or None."""
        hit = self._load().get(path)
        if hit is None or hit[0] != size or hit[1] != mtime_ns:
            return None  # stale: the file changed since
        return hit[2]

    def put(self, path: str, size: int, mtime_ns: int, value) -> None:
        """Remember `value` (JSON-able) for this version of the file; written by `flush`."""
        entries = self._load()
        entries.pop(path, None)  # to the end: the most recently written
        entries[path] = [size, mtime_ns, value]
        self._dirty = self._file is not None

    def forget(self, path: str) -> None:
        """Drop an entry whose value the caller found malformed."""
        if self._load().pop(path, None) is not None:
            self._dirty = self._file is not None

    def flush(self) -> None:
        """Write the entries if any changed: atomically, never a half-written file."""
        if not self._dirty or self._file is None:
            return
        import tempfile  # only when writing: a warm run reads, and tempfile imports random

        self._dirty = False
        for old in list(self._entries)[:max(0, len(self._entries) - self.limit)]:
            del self._entries[old]
        d = os.path.dirname(self._file)
        tmp = None
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.name + ".", suffix=".tmp", dir=d)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._entries, f, separators=(",", ":"))
            os.replace(tmp, self._file)
            tmp = None
        except OSError:
            self._file = None  # a read-only home, a full disk: run without the store
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

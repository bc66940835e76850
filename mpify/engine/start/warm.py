"""What the forkserver imports beyond numpy and torch, each import checked, and the verdict.

Every rank is forked from the forkserver, so whatever it has imported a rank gets for free: DDP's
first construction imports torch._dynamo (about 800 modules, sympy included: 1.2 to 1.9 s per rank,
per launch, when not preloaded). The caller names the extra modules in MPIFY_PRELOAD (JSON list),
and this module, imported last by the forkserver, imports them one by one.

A module is only safe to hold in a process that forks if it started no thread (a forked child
gets a copy of every lock that thread held, held forever) and did not initialise CUDA (a forked
child cannot use it). After each import both are checked; the first module that breaks either
rule stops the preloading, and the verdict written to MPIFY_PRELOAD_REPORT tells the caller to
start the forkserver again without it (pool.py).

Run in the forkserver only; importing it elsewhere does nothing.

remove_leftovers runs at a forkserver's exit (a zygote's too): a caller that was killed (SIGKILL,
the OOM killer) ran no exit handler, so the files its exit would have removed (multiprocess's
`pymp-*` folder with the forkservers' sockets, a verdict it never read) are removed by the
forkservers that outlive it, each told at its start which are the caller's (forkserver.py).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import threading

LIST_ENV = "MPIFY_PRELOAD"
REPORT_ENV = "MPIFY_PRELOAD_REPORT"
# The caller's sys.path (JSON list). multiprocess hands it to the forkserver's main(), which
# ignores it, so packages found through a path the caller added would not be found here.
PATH_ENV = "MPIFY_PRELOAD_PATH"


def thread_count() -> int:
    """Threads of this process, native ones included (OpenBLAS pools, C++ loops)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs: Python's own threads only
        return threading.active_count()


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


def preload(names: list[str]) -> dict:
    """Import `names` in order until one is unsafe; say what was loaded and what was refused."""
    loaded: list[str] = []
    missing: list[str] = []
    for name in names:
        threads = thread_count()
        try:
            __import__(name)
        except BaseException:  # any failure at import: the rank will meet it itself, if it needs it
            missing.append(name)
            continue
        if thread_count() > threads:
            return {"loaded": loaded, "missing": missing, "refused": name, "why": "it started a thread"}
        if cuda_initialised():
            return {"loaded": loaded, "missing": missing, "refused": name, "why": "it initialised CUDA"}
        loaded.append(name)
    return {"loaded": loaded, "missing": missing, "refused": None, "why": None}


def remove_leftovers(caller: int, paths: list[str]) -> None:
    """At a forkserver's exit: remove `paths`, what its caller's exit would have removed, if the
    caller is gone (_caller_gone). Never raises: the forkserver is exiting anyway.

    A caller that lives (it retired this forkserver, which exits once its ranks have) removes
    these files itself (forkserver.py's reapers, multiprocess's exit handler): then nothing is touched
    here, so no file of a live process is removed. A caller that exited normally removed them
    already: then nothing is left to remove."""
    if not _caller_gone(caller):
        return
    import shutil

    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)  # another forkserver of the caller's may race us
            else:
                os.unlink(path)
        except OSError:  # gone already (removed by the caller, or by another of its forkservers)
            pass


# The kernel flags word's bit for "this task is exiting" (PF_EXITING in include/linux/sched.h;
# /proc/PID/stat's 9th field, proc(5)).
_PF_EXITING = 0x4


def _caller_gone(caller: int) -> bool:
    """Whether the caller, whose child this forkserver is (started or forked by it), has exited
    or is exiting, once the alive pipe has reached EOF.

    Reparented (getppid() names another process): its exit is complete. Still our parent: it
    lives (it retired us: closed the alive pipe itself), or it is exiting right now, as the kernel
    closes a dying process's files, hence the pipe's EOF, before it reparents its children; such
    a process is a zombie or has PF_EXITING set (read from /proc). Only in the microseconds
    between the two reads could the caller finish exiting, be reaped and its pid go to a new
    process (after a wrap-around of pids). Without /proc (macOS) a caller still our parent
    counts as alive: its files are then left behind, as before."""
    if os.getppid() != caller:
        return True
    try:
        with open(f"/proc/{caller}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold spaces
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError, ValueError):
        return False


def _main() -> None:
    names = json.loads(os.environ.get(LIST_ENV) or "[]")
    path = json.loads(os.environ.get(PATH_ENV) or "null")
    if path is not None:
        sys.path[:] = path
    report = os.environ.get(REPORT_ENV)
    verdict = preload(names)
    # Everything the forkserver holds now, dependencies included (sympy came with torch._dynamo):
    # the caller importing one of these later needs no new forkserver.
    verdict["present"] = sorted(name for name in sys.modules if "." not in name)
    # Every preloaded object into the permanent generation: a rank's garbage collections then
    # never walk them, and never write to (so never copy) the pages they share with the
    # forkserver. With torch._dynamo preloaded a full collection in a fresh rank took ~0.2 s.
    gc.freeze()
    if report:
        part = report + ".part"
        with open(part, "w") as f:
            json.dump(verdict, f)
        os.replace(part, report)  # whole or absent: the caller never reads half a verdict


if LIST_ENV in os.environ:  # set only for the forkserver that forkserver.py starts
    _main()

"""What the forkserver imports beyond numpy and torch, each import checked, and the verdict.

Every rank is forked from the forkserver, so whatever it has imported a rank gets for free: DDP's
first construction imports torch._dynamo (about 800 modules, sympy included: 1.2 to 1.9 s per rank,
per launch, when not preloaded). The caller names the extra modules in MPIFY_PRELOAD (JSON list),
and this module, imported last by the forkserver, imports them one by one.

A module is only safe to hold in a process that forks if it started no thread (a forked child
gets a copy of every lock that thread held, held forever) and did not initialise CUDA (a forked
child cannot use it). After each import both are checked; the first module that breaks either
rule stops the preloading, and the verdict written to MPIFY_PRELOAD_REPORT tells the caller to
start the forkserver again without it (starter.py).

Run in the forkserver only; importing it elsewhere does nothing.
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


if LIST_ENV in os.environ:  # set only for the forkserver that starter.py starts
    _main()

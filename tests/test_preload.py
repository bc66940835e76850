"""What the forkserver holds before a rank starts (engine/start/pool.py, engine/start/warm.py): what DDP's
first construction imports when the caller has torch, the caller's installed packages, and never
a package that started a thread at import (a forked rank would inherit that thread's locks)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import die_with_parent


def run(tmp_path, body: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-u", str(path)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env, preexec_fn=die_with_parent)


# One fresh torch caller (one torch import, one forkserver start) for the two tests that need one:
# what its ranks hold, and how many threads its forkserver runs.
TORCH_CALLER = '''
    import os, sys
    import torch
    from mpify import ranch
    baseline = len(os.listdir("/proc/self/task"))  # this process, torch imported: the same import

    def held():
        return sorted(m for m in ("torch._dynamo", "torch.nn.parallel.distributed",
                                  "torch.distributed.nn.functional", "sympy") if m in sys.modules)

    from mpify.engine.start import pool

    print("first", ranch(2, held, caller_rank=None, gather=True))  # served by a quick forkserver
    pid = pool.wait_complete()  # the one started in the background after the first launch
    print("held", ranch(2, held, caller_rank=None, gather=True))
    assert set(ranch(2, os.getppid, caller_rank=None, gather=True)) == {pid}
    print("threads", baseline, len(os.listdir(f"/proc/{pid}/task")))
'''


@pytest.fixture(scope="module")
def torch_caller(tmp_path_factory):
    proc = run(tmp_path_factory.mktemp("torch_caller"), TORCH_CALLER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_a_torch_caller_gets_ranks_that_already_hold_dynamo(torch_caller, no_strays):
    everything = ["sympy", "torch._dynamo", "torch.distributed.nn.functional", "torch.nn.parallel.distributed"]
    first = next(line for line in torch_caller.stdout.splitlines() if line.startswith("first "))
    assert "torch._dynamo" not in first  # the first launch did not wait for what it does not use
    assert f"held {[everything, everything]}" in torch_caller.stdout


def test_a_package_that_starts_a_thread_is_left_out(tmp_path, no_strays):
    """Two installed packages imported by the caller: a plain one is preloaded, one that starts a
    thread at import is not (MPIFY_DEBUG says so), and the forkserver runs one thread."""
    site = tmp_path / "site-packages"
    site.mkdir()

    def package(name: str, body: str) -> None:
        # Ten submodules: big enough to be worth preloading (pool._WORTH_PRELOADING).
        (site / name).mkdir()
        for i in range(10):
            (site / name / f"part{i}.py").write_text(f"N = {i}\n")
        parts = "".join(f"from . import part{i}\n" for i in range(10))
        (site / name / "__init__.py").write_text(parts + textwrap.dedent(body))

    (site / "tinypkg.py").write_text("def value():\n    return 5\n")
    # Each records the process that imported it: the forkserver (preloaded), or the rank itself.
    package("plainpkg", "import os\nVALUE = 41\nIMPORTED_BY = os.getpid()\n")
    package("chattypkg", '''
        import threading, time
        import os
        threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="chatty").start()
        VALUE = 1
        IMPORTED_BY = os.getpid()
    ''')
    proc = run(tmp_path, f'''
        import sys
        sys.path.insert(0, {str(site)!r})
        import plainpkg, chattypkg
        from mpify import ranch
        from mpify.engine.start import pool

        def held():
            import os
            mine = os.getpid()
            return plainpkg.IMPORTED_BY != mine, chattypkg.IMPORTED_BY != mine, plainpkg.VALUE + chattypkg.VALUE

        print("quick", ranch(2, held, caller_rank=None, gather=True))
        print("forkserver", pool.wait_complete())
        print("held", ranch(2, held, caller_rank=None, gather=True))
        print("again", ranch(2, held, caller_rank=None, gather=True), pool.wait_complete())
        import tinypkg  # one module, as a kernel imports lazily: not worth a new forkserver
        print("small", ranch(2, tinypkg.value, caller_rank=None, gather=True), pool.wait_complete())
    ''', {"MPIFY_DEBUG": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quick [(False, False, 42), (False, False, 42)]" in proc.stdout  # the ranks imported both
    assert "held [(True, False, 42), (True, False, 42)]" in proc.stdout
    assert "not preloading chattypkg: it started a thread in the forkserver" in proc.stderr
    server = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("forkserver "))
    # The verdict is kept: the second launch finds the same forkserver, not a restart for the package.
    assert f"again [(True, False, 42), (True, False, 42)] {server}" in proc.stdout
    assert f"small [5, 5] {server}" in proc.stdout


def test_the_forkserver_runs_no_extra_thread(torch_caller, no_strays):
    """After preloading torch and torch._dynamo, the forkserver's threads are those torch itself
    starts at import (none of the preloaded extras added one)."""
    _, caller, server = next(line for line in torch_caller.stdout.splitlines() if line.startswith("threads")).split()
    assert int(server) <= int(caller)

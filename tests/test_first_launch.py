"""The first launch of a session, and the launches after the caller imported something new
(engine/start/pool.py): forkservers started ahead of need in an interactive session, a first launch
that does not wait for preloads it does not use, and a new forkserver that never blocks a launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil

from helpers import die_with_parent


def forkservers_of(pid: int) -> set[int]:
    """The forkserver processes among `pid`'s children, as `ps` shows them."""
    out = set()
    for p in psutil.Process(pid).children():
        try:
            if any("multiprocess.forkserver" in part for part in p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def execute(kc, code: str, timeout: float = 120) -> str:
    """Run a cell; its stdout (raises on an error)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


# A cell: 4 ranks' gloo init + all_reduce; each rank says hello and returns the sum, its parent's
# pid and command line (the forkserver's, or the caller's own when the caller was forked).
ALLREDUCE = textwrap.dedent("""
    def allreduce():
        import torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1)
        dist.all_reduce(t)
        dist.destroy_process_group()
        print("hello from", os.environ["RANK"])
        return t.item(), os.getppid(), psutil.Process(os.getppid()).cmdline()
""")


def test_importing_mpify_in_a_kernel_starts_the_forkservers_ahead(kernel_name, no_strays):
    """`import mpify` in a notebook starts them; 3 s later (a notebook's rhythm) the first launch
    forks its ranks from one of them rather than starting one. A `%reset -f` does not break the
    next launch."""
    from conftest import jupyter_kernel

    with jupyter_kernel(kernel_name) as (km, kc):
        kernel = km.provisioner.process.pid
        # Had none been ready 3 s later (a loaded machine), the launch would fork the kernel
        # (the test below): here it waits for the first of them instead.
        execute(kc, "import os, time, torch, psutil\nos.environ['MPIFY_ZYGOTE'] = '0'")
        assert forkservers_of(kernel) == set()
        execute(kc, "import mpify")
        deadline = time.monotonic() + 5
        while not forkservers_of(kernel) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert forkservers_of(kernel), "no forkserver started at import"
        time.sleep(3)
        # Every forkserver the import started, taken before the launch: on a loaded machine the
        # second was not up yet when the first was seen, and the launch forked from it.
        ahead = forkservers_of(kernel)
        out = execute(kc, ALLREDUCE + textwrap.dedent("""
            t = time.perf_counter()
            got = mpify.ranch(4, allreduce, gather=True)
            print("took", time.perf_counter() - t)
            print("parents", sorted({p for _, p, _ in got[1:]}), "sums", {s for s, _, _ in got})
        """))
        parents = eval(out.split("parents ", 1)[1].split(" sums")[0])
        assert set(parents) <= ahead and len(parents) == 1, (parents, ahead)
        assert "sums {4.0}" in out
        # How fast: benchmarks/bench_launch.py --first (a time bound here would only measure the
        # machine's load).

        # `%reset -f` deletes the notebook's dunders, __spec__ included, which multiprocess reads
        # at every process start: a launch after it still works.
        execute(kc, "%reset -f")
        out = execute(kc, "import os, mpify\nprint('after reset', len(mpify.ranch(2, os.getpid, gather=True)))")
        assert "after reset 2" in out


def test_a_kernels_first_launch_right_after_import_forks_the_kernel(kernel_name, no_strays):
    """Right after `import mpify` no forkserver is ready yet (each is importing torch): the
    kernel itself is forked to serve that one launch, as a script is (the zygote). The kernel's
    own threads (zmq's, its output capture's) do not stop that fork; a thread of the user's does.
    The forked kernel is gone with its launch, the kernel's output still works, and the next
    launch forks from a forkserver that `import mpify` started."""
    from conftest import jupyter_kernel
    from helpers import wait_gone

    with jupyter_kernel(kernel_name) as (km, kc):
        kernel = km.provisioner.process.pid
        execute(kc, "import os, time, torch, psutil")
        out = execute(kc, ALLREDUCE + textwrap.dedent("""
            import mpify
            t = time.perf_counter()
            got = mpify.ranch(4, allreduce, gather=True)
            print("took", round(time.perf_counter() - t, 2))
            print("RESULT", repr([(s, p, c) for s, p, c in got[1:]]))
        """))
        got = eval(out.split("RESULT ", 1)[1].strip())
        assert {s for s, _, _ in got} == {4.0}
        parents = sorted({p for _, p, _ in got})
        assert len(parents) == 1 and parents[0] != kernel, (parents, kernel)
        assert got[0][2] == psutil.Process(kernel).cmdline()  # the kernel, forked
        assert all(f"hello from {r}" in out for r in range(4)), out
        assert wait_gone(parents, 10) == []
        assert execute(kc, "print('still here')") == "still here\n"

        # Once a forkserver is ready (a launch right now would fork the kernel again, as a script's does)
        out = execute(kc, "from mpify.engine.start import pool\npool.wait_complete()\n"
                          "print('NEXT', mpify.ranch(2, allreduce, gather=True)[1][2])")
        assert "multiprocess.forkserver" in out.split("NEXT", 1)[1], out

        # No forkserver ready and a thread of the user's alive: the kernel is not forked.
        out = execute(kc, textwrap.dedent("""
            import threading
            pool.shutdown()
            stop = threading.Event()
            waiter = threading.Thread(target=stop.wait)
            waiter.start()
            print('THREADED', mpify.ranch(2, allreduce, gather=True)[1][2])
            stop.set()
            waiter.join()
        """))
        assert "multiprocess.forkserver" in out.split("THREADED", 1)[1], out


def interactive(body: str, env_extra: dict) -> subprocess.CompletedProcess:
    """`python -i` fed `body` on stdin, as a REPL user types it."""
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-i", "-q"], input=textwrap.dedent(body), capture_output=True,
                          text=True, timeout=120, env=env, preexec_fn=die_with_parent)


def test_prewarm_is_for_interactive_sessions_and_can_be_turned_off(no_strays):
    look = """
        import time, os
        import mpify
        time.sleep(1.0)
        import psutil
        print("SERVERS", sum(any("multiprocess.forkserver" in c for c in p.cmdline())
                             for p in psutil.Process().children()))
    """
    # A complete one; a launch before it is ready forks the session itself (the zygote). Without
    # the zygote a quick one too, for such a launch to wait less.
    assert "SERVERS 1" in interactive(look, {}).stdout
    assert "SERVERS 2" in interactive(look, {"MPIFY_ZYGOTE": "0"}).stdout
    assert "SERVERS 0" in interactive(look, {"MPIFY_PREWARM": "0"}).stdout
    script = subprocess.run([sys.executable, "-c", textwrap.dedent(look)], capture_output=True, text=True,
                            timeout=120, preexec_fn=die_with_parent)
    assert "SERVERS 0" in script.stdout, script.stderr  # a script starts them at its first launch


def test_a_launch_never_waits_for_a_new_forkserver(tmp_path, no_strays):
    """The caller imports a slow, big package after its launches began: the next launch is served
    at once by the forkserver it had (its ranks import the package themselves), while a new one
    preloads the package in the background; the launch after that finds it there."""
    site = tmp_path / "site-packages"
    (site / "slowpkg").mkdir(parents=True)
    for i in range(10):  # big enough to be worth preloading (pool._WORTH_PRELOADING)
        (site / "slowpkg" / f"part{i}.py").write_text(f"N = {i}\n")
    (site / "slowpkg" / "__init__.py").write_text(
        "import os, time\n" + "".join(f"from . import part{i}\n" for i in range(10))
        + "time.sleep(4)  # a package that takes seconds to import (transformers, fastai)\n"
        + "IMPORTED_BY = os.getpid()\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f'''
        import os, sys, time
        sys.path.insert(0, {str(site)!r})
        import torch
        from mpify import ranch
        from mpify.engine.start import pool

        def where():
            slow = sys.modules.get("slowpkg")
            return os.getppid(), slow is not None and slow.IMPORTED_BY != os.getpid()

        ranch(2, where)
        before = pool.wait_complete()
        import slowpkg
        t = time.perf_counter()
        got = ranch(2, where, caller_rank=None, gather=True)
        print("after import", round(time.perf_counter() - t, 2), got, before)
        after = pool.wait_complete()
        print("new", ranch(2, where, caller_rank=None, gather=True), after)
    '''))
    proc = subprocess.run([sys.executable, "-u", str(script)], capture_output=True, text=True, timeout=240,
                          preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("after import"))
    took, rest = line.split()[2], line.split(" ", 3)[3]
    before = int(rest.rsplit(" ", 1)[1])
    # Served at once by the forkserver it had, which does not hold slowpkg (this fn does not use
    # it); not after the 4 s a new forkserver spends importing it.
    assert f"[({before}, False), ({before}, False)]" in rest, line
    assert float(took) < 4.0, line
    new = next(x for x in proc.stdout.splitlines() if x.startswith("new"))
    after = int(new.rsplit(" ", 1)[1])
    assert after != before and f"[({after}, True), ({after}, True)]" in new, new


def test_a_new_forkserver_beside_a_live_world_does_not_wait_for_the_worlds_ranks(tmp_path, no_strays):
    """A user's OMP_* change needs a new forkserver; the old one still has the world's ranks. The
    launch is served by the new one at once, and the world goes on (it used to wait for the old
    forkserver to exit, which it does only with the world's ranks: forever)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''
        import os, time
        import torch
        from mpify import ranch, World

        ranch(2, os.getpid)
        with World(2) as w:
            os.environ["OMP_NUM_THREADS"] = "2"  # read at import: the next launch needs a new forkserver
            print("beside", ranch(2, lambda: os.environ["OMP_NUM_THREADS"], gather=True), flush=True)
            print("world", w.run(lambda: os.environ["OMP_NUM_THREADS"], gather=True), flush=True)
        print("closed", flush=True)
    '''))
    proc = subprocess.run([sys.executable, "-u", str(script)], capture_output=True, text=True, timeout=120,
                          preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "beside ['2', '2']" in proc.stdout and "closed" in proc.stdout, proc.stdout
    assert "world [" in proc.stdout


ZYGOTE = '''
import atexit, json, os, subprocess, sys, threading, time
import psutil
import torch
from mpify import ranch
from mpify.engine.start import pool

atexit.register(lambda: print("BYE", os.getpid(), flush=True))
cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
sys.stdout.write("UNFLUSHED\\n")  # stdout is a pipe here: block-buffered, still in the buffer

def where():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item(), os.getppid(), psutil.Process(os.getppid()).cmdline()

got = ranch(3, where, gather=True)
parents = sorted({p for _, p, _ in got[1:]})
print("FIRST", json.dumps({"sums": [s for s, _, _ in got], "parents": parents, "me": os.getpid(),
                           "cmdlines": [c for _, _, c in got[1:2]]}))
cat.stdin.close()
print("CAT", cat.wait(timeout=10), flush=True)
if os.environ.get("MPIFY_ZYGOTE") != "0":
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in parents):
        assert time.monotonic() < deadline, "the zygote outlived its launch"
        time.sleep(0.05)
    print("ZYGOTE GONE", flush=True)
    again = ranch(2, where, gather=True)[1]  # a launch right after: forked again, not waiting
    print("AGAIN", again[1] not in parents and again[2] == got[1][2], flush=True)
pool.shutdown()
stop = threading.Event()
waiter = threading.Thread(target=stop.wait)
waiter.start()
got = ranch(2, where, gather=True)
print("THREADED", got[1][2])
stop.set()
waiter.join()
'''


def test_a_scripts_first_launch_forks_the_script_itself(tmp_path, no_strays):
    """A script has one Python thread and no CUDA at its first launch: it is forked to serve that
    launch at once (the zygote, engine/start/zygote.py) instead of waiting for a new forkserver's torch
    import. The zygote holds none of the script's pipes, prints none of its unflushed output and
    runs none of its atexit handlers; it is gone with the script. A caller with a Python thread of
    its own is never forked, and MPIFY_ZYGOTE=0 turns it off. The zygote lives no longer than its
    launch (it holds the caller's memory as of the fork)."""
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE)
    cmd = [sys.executable, str(script)]  # not -u: the unflushed line must be in a buffer at the fork
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(env_extra):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, preexec_fn=die_with_parent,
                              env=dict(env, **env_extra))

    from helpers import parallel, wait_gone

    forked, off = parallel(lambda: run({}), lambda: run({"MPIFY_ZYGOTE": "0"}))
    assert forked.returncode == 0, forked.stderr[-3000:]
    line = next(x for x in forked.stdout.splitlines() if x.startswith("FIRST"))
    first = json.loads(line[len("FIRST "):])
    assert first["sums"] == [3.0, 3.0, 3.0]
    parents = first["parents"]
    assert len(parents) == 1 and parents[0] != first["me"] and first["cmdlines"] == [cmd], first
    assert forked.stdout.count("UNFLUSHED") == 1, forked.stdout
    assert forked.stdout.count("BYE") == 1 and f"BYE {first['me']}" in forked.stdout, forked.stdout
    assert "CAT 0" in forked.stdout and "ZYGOTE GONE" in forked.stdout and "AGAIN True" in forked.stdout
    threaded = next(x for x in forked.stdout.splitlines() if x.startswith("THREADED"))
    assert "multiprocess.forkserver" in threaded, threaded
    assert wait_gone(parents, 10) == []
    assert off.returncode == 0, off.stderr[-3000:]
    assert "multiprocess.forkserver" in next(x for x in off.stdout.splitlines() if x.startswith("FIRST"))

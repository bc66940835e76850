"""Every way a launch can go wrong, each with a clear error and nothing left behind."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import alive, die_with_parent, python_script, wait_gone
from mpify import LaunchTimeoutError, RankDiedError, RankRaisedError, RemoteTraceback, ranch

torch = pytest.importorskip("torch")


def raise_in_rank_2():
    if os.environ["RANK"] == "2":
        raise ValueError("bad value in rank 2")
    return "fine"


def test_rank_exception_keeps_type_traceback_and_ranks(no_strays):
    with pytest.raises(ValueError, match="bad value in rank 2") as info:
        ranch(3, raise_in_rank_2)
    exc = info.value
    assert exc.mpify_rank == 2 and exc.mpify_failed_ranks == [2]
    assert "mpify: raised in rank 2 of 3; failed ranks: 2" in exc.__notes__
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_in_rank_2" in exc.__cause__.text and "ValueError: bad value in rank 2" in exc.__cause__.text


def test_exception_that_cannot_be_rebuilt_becomes_rank_raised_error(no_strays, tmp_path):
    def f():
        if os.environ["RANK"] == "1":
            # A module only this rank can import: the caller cannot rebuild its exception type.
            (tmp_path / "rank_only_mod.py").write_text("class RankOnlyError(Exception): pass\n")
            sys.path.insert(0, str(tmp_path))
            import rank_only_mod
            raise rank_only_mod.RankOnlyError("odd one")
    with pytest.raises(RankRaisedError, match=r"rank 1 raised rank_only_mod.RankOnlyError: odd one") as info:
        ranch(2, f)
    assert "RankOnlyError" in info.value.traceback_text
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_rank_that_exits_is_reported_with_exit_code(no_strays):
    def f():
        if os.environ["RANK"] == "1":
            os._exit(3)
        return 1
    with pytest.raises(RankDiedError, match="rank 1 died without raising an exception: exit code 3") as info:
        ranch(2, f)
    assert info.value.exitcode == 3


def allreduce_then_die():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    print("PID", os.getpid(), flush=True)
    if dist.get_rank() == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 (the caller) and rank 2 block here until rank 1 is gone
    dist.destroy_process_group()


def test_sigkilled_rank_while_caller_waits_in_gloo_allreduce(no_strays, capsys):
    start = time.monotonic()
    with pytest.raises(RankDiedError) as info:
        ranch(3, allreduce_then_die)
    took = time.monotonic() - start
    assert took < 10, f"the error took {took:.1f} s"
    assert info.value.rank == 1 and "SIGKILL" in str(info.value) and "out-of-memory" in str(info.value)
    pids = [int(p) for p in re.findall(r"PID (\d+)", capsys.readouterr().out)]
    assert len(pids) == 3 and not alive(set(pids) - {os.getpid()})
    import torch.distributed as dist
    assert not dist.is_initialized()


def die_unseen_while_peers_allreduce():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    parents = [None] * dist.get_world_size()
    dist.all_gather_object(parents, os.getppid())
    if dist.get_rank() == 0:  # the caller: resumes rank 1's parent after 2 s (the test does too)
        threading.Timer(2.0, os.kill, (parents[1], signal.SIGCONT)).start()
    if dist.get_rank() == 1:
        # The parent (the forkserver) reaps this rank and tells the caller it died. Stopped, it
        # tells nobody for 2 s: an overloaded machine's late report, made certain. The peers'
        # all_reduce fails at once with gloo's "Connection closed by peer".
        os.kill(os.getppid(), signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()


def test_a_death_seen_late_is_still_the_cause_not_its_peers_lost_connections(no_strays):
    parents = {p.ppid() for p in psutil.Process().children(recursive=True)}
    try:
        with pytest.raises(RankDiedError) as info:
            ranch(3, die_unseen_while_peers_allreduce)
    finally:
        for pid in {p.ppid() for p in psutil.Process().children(recursive=True)} | parents:
            if pid != os.getpid():
                os.kill(pid, signal.SIGCONT)
    assert info.value.rank == 1 and "SIGKILL" in str(info.value)
    assert info.value.mpify_failed_ranks == [1]


def die_before_init():
    import torch.distributed as dist
    if os.environ["RANK"] == "1":
        os._exit(7)
    dist.init_process_group("gloo")  # rank 0 (the caller) waits here for rank 1, which never comes


def allreduce_sum():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def test_dead_rank_while_caller_waits_in_init_process_group(no_strays):
    start = time.monotonic()
    with pytest.raises(RankDiedError, match="exit code 7"):
        ranch(2, die_before_init)
    assert time.monotonic() - start < 10
    # The caller's failed init left nothing that breaks the next launch (torch's group counter).
    assert ranch(2, allreduce_sum, timeout=60) == 2.0


def test_child_failure_interrupts_caller_rank_in_python_code(no_strays):
    def f():
        if os.environ["RANK"] == "1":
            raise KeyError("from rank 1")
        time.sleep(60)  # rank 0, the caller, is not waiting on rank 1 at all
    start = time.monotonic()
    with pytest.raises(KeyError, match="from rank 1"):
        ranch(2, f)
    assert time.monotonic() - start < 10


def test_timeout_stops_every_rank(no_strays):
    def f():
        print("PID", os.getpid(), flush=True)
        time.sleep(60)
    start = time.monotonic()
    with pytest.raises(LaunchTimeoutError, match="timeout of 1.0 s"):
        ranch(3, f, timeout=1.0)
    assert time.monotonic() - start < 6


def test_a_stop_signals_each_rank_once(monkeypatch):
    # Was: the rank's group, then the rank itself, so every rank got the stop's SIGINT twice.
    # When the second came after the first's KeyboardInterrupt had begun the rank's report, it
    # broke off the send; the rank exited with code 0 and no message, and a timed-out launch
    # (ranks asleep, a loaded machine) reported "rank N died ...: exit code 0".
    from mpify.engine.launch import teardown
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a rank after setpgid
    loner = subprocess.Popen(["sleep", "30"])  # a rank before setpgid: no group of its own yet
    handles = {}
    for p in (leader, loner):
        teardown.track(handles, p.pid)  # as a launch does when it starts its ranks
    sent = []
    real_killpg, real_kill = os.killpg, os.kill
    alone = "pidfd" if teardown._pidfds_work else "kill"

    def spy(name, real):
        def send(pid, sig):
            if pid in (leader.pid, loner.pid):
                sent.append((name, pid))
            return real(pid, sig)
        return send
    monkeypatch.setattr(teardown.os, "killpg", spy("killpg", real_killpg))
    monkeypatch.setattr(teardown.os, "kill", spy("kill", real_kill))
    if alone == "pidfd":
        real_send = signal.pidfd_send_signal
        fds = {handles[p.pid]: p.pid for p in (leader, loner)}
        monkeypatch.setattr(teardown.signal, "pidfd_send_signal",
                            lambda fd, sig: (sent.append(("pidfd", fds[fd])), real_send(fd, sig))[1])
    try:
        teardown._signal_rank(leader.pid, signal.SIGTERM, handles)
        teardown._signal_rank(loner.pid, signal.SIGTERM, handles)
        assert leader.wait(10) == -signal.SIGTERM and loner.wait(10) == -signal.SIGTERM
    finally:
        monkeypatch.undo()
        teardown.release(handles)
        for p in (leader, loner):
            p.kill()
            p.wait()
    # The loner's killpg found no group; only the signal to it alone reached it.
    assert sent == [("killpg", leader.pid), ("killpg", loner.pid), (alone, loner.pid)]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux's")
def test_a_rank_alone_is_reached_through_its_pidfd_never_by_its_pid(monkeypatch):
    """A reaped rank's pid may be another process's or thread's by the time a stop comes (a test
    run once killed its own worker that way): a tracked rank is signalled and asked after through
    the pidfd opened when it started, and once reaped it is gone, whatever now has its pid. Each
    launch and world keeps its ranks' pidfds: a pid reused while an older world still holds its
    dead rank's entry is another entry."""
    from mpify.engine.launch import teardown
    loner = subprocess.Popen(["sleep", "30"])  # a rank before setpgid: no group of its own
    handles = {}
    teardown.track(handles, loner.pid)
    if not teardown._pidfds_work:
        loner.kill()
        loner.wait()
        pytest.skip("this kernel has no pidfds (before Linux 5.3)")
    kills = []
    real_kill = os.kill
    monkeypatch.setattr(teardown.os, "kill", lambda pid, sig: (kills.append((pid, sig)), real_kill(pid, sig))[1])
    try:
        assert teardown.rank_alive(loner.pid, handles)
        teardown._signal_rank(loner.pid, signal.SIGTERM, handles)
        assert loner.wait(10) == -signal.SIGTERM  # reaped: its pid is free for anyone
        assert not teardown.rank_alive(loner.pid, handles)
        teardown.stop_ranks([loner.pid], first=signal.SIGKILL, handles=handles)
        teardown.release(handles)  # a teardown that ran meanwhile: the rank is gone to a stop
        assert not teardown.rank_alive(loner.pid, handles)
    finally:
        monkeypatch.undo()
        teardown.release(handles)
    assert kills == [] and handles == {}


def test_a_launch_and_a_world_close_the_pidfds_of_their_ranks(no_strays):
    from mpify import World
    from mpify.engine.launch import teardown

    def pidfds():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                    out.append(fd)
            except OSError:
                pass
        return out

    assert ranch(2, os.getpid, gather=True)[1] != os.getpid()
    if not teardown._pidfds_work:
        pytest.skip("this kernel has no pidfds (before Linux 5.3)")
    with World(2) as w:
        assert len(pidfds()) == 1  # rank 1's, while the world lives
        w.run(os.getpid)
    assert pidfds() == []


def test_a_rank_reporting_as_the_stop_comes_still_gets_its_error_through(no_strays):
    # Was: the stop's SIGINT, landing while the rank sent its error, raised KeyboardInterrupt in
    # the middle of the send; the message was lost, the rank exited with code 0, and the launch
    # reported the timeout (or "rank 1 died ...: exit code 0") instead of the rank's error, which
    # came before the stop.
    def f():
        if os.environ["RANK"] == "0":
            time.sleep(60)

        class FlushUntilStopped:
            """A stdout whose first flush (the rank's report flushes before it sends) lasts until
            the stop's SIGINT has come, passing the signal on to whoever handles it."""

            def __init__(self, stream):
                self.stream, self.waited = stream, False

            def write(self, text):
                return self.stream.write(text)

            def flush(self):
                if not self.waited:
                    self.waited = True
                    came, handler = [], signal.getsignal(signal.SIGINT)

                    def chained(signum, frame):
                        came.append(signum)
                        handler(signum, frame)
                    signal.signal(signal.SIGINT, chained)
                    try:
                        deadline = time.monotonic() + 30
                        while not came and time.monotonic() < deadline:
                            time.sleep(0.01)
                    finally:
                        signal.signal(signal.SIGINT, handler)
                self.stream.flush()

        sys.stdout = FlushUntilStopped(sys.stdout)
        raise ValueError("raised before the timeout, reported after it")

    with pytest.raises(ValueError, match="raised before the timeout") as info:
        ranch(2, f, timeout=1.0)
    assert info.value.mpify_rank == 1


def spawn_grandchildren():
    """A rank with DataLoader-like workers: a forked Python worker and an exec'd process."""
    import multiprocessing
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    sleeper = subprocess.Popen(["sleep", "60"])
    return [os.getpid(), worker.pid, sleeper.pid]


@pytest.mark.parametrize("outcome", ["return", "raise"])
def test_grandchildren_are_gone_when_ranch_returns(no_strays, outcome, tmp_path):
    record = tmp_path / "pids"

    def f():
        pids = spawn_grandchildren()
        record.open("a").write(" ".join(map(str, pids)) + "\n")
        if outcome == "raise":
            deadline = time.monotonic() + 30
            while len(record.read_text().splitlines()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # both ranks have started their workers before one fails
            raise RuntimeError("after starting workers")
        return pids

    if outcome == "raise":
        with pytest.raises(RuntimeError):
            ranch(2, f, caller_rank=None)
    else:
        ranch(2, f, caller_rank=None)
    pids = {int(p) for p in record.read_text().split()}
    assert len(pids) == 6
    assert not alive(pids)


LAUNCHER = """
import os, sys, time, ctypes
from mpify import ranch

def f():
    print("PID", os.getpid(), flush=True)
    libc = ctypes.CDLL(None)
    if os.environ["RANK"] == "0":
        # the launcher itself: block in C code the way a stuck collective does
        import torch.distributed as dist
        dist.init_process_group("gloo")
        print("READY", flush=True)
        dist.barrier()
    else:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        while True:
            libc.sleep(1000)

try:
    ranch(3, f)
except KeyboardInterrupt:
    print("KeyboardInterrupt reached the launcher", flush=True)
    sys.exit(130)
"""


def _start_launcher(tmp_path):
    proc = subprocess.Popen(python_script(tmp_path, LAUNCHER), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=die_with_parent)
    pids, lines = set(), []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        m = re.search(r"PID (\d+)", line)
        if m:
            pids.add(int(m.group(1)))
        if "READY" in line and len(pids) == 3:
            time.sleep(0.5)  # every rank is now asleep in C code
            return proc, pids
        if not line:
            break
    proc.kill()
    raise AssertionError("launcher did not get ready:\n" + "".join(lines))


def test_sigint_to_launcher_whose_ranks_sleep_in_c(tmp_path):
    proc, pids = _start_launcher(tmp_path)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    took = time.monotonic() - start
    assert "KeyboardInterrupt reached the launcher" in out, out
    assert proc.returncode == 130
    assert took < 5, f"took {took:.1f} s"
    assert not wait_gone(pids, 1.0)


def test_sigkilled_launcher_takes_its_ranks_along(tmp_path):
    proc, pids = _start_launcher(tmp_path)
    proc.kill()
    proc.wait()
    left = wait_gone(pids, 5.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks outlived their launcher: {left}"


def _dies_in_rank_1():
    if os.environ["RANK"] == "1":
        os._exit(7)
    return 0


def _nested_launch_that_fails():
    return ranch(2, _dies_in_rank_1)


def test_a_nested_launchs_failure_keeps_its_type(no_strays):
    """A rank that launches its own ranks, one of which dies: the outer caller gets the inner
    RankDiedError as itself (it pickles and rebuilds), not a RankRaisedError naming it."""
    from mpify import RankDiedError

    with pytest.raises(RankDiedError) as info:
        ranch(2, _nested_launch_that_fails, caller_rank=None)
    assert info.value.rank == 1 and info.value.exitcode == 7
    assert "exit code 7" in str(info.value)

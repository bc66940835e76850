"""Shared test helpers: looking at the process table the way a user would (`ps`)."""
from __future__ import annotations

import os
import sys
import threading
import time

import psutil


# Jupyter kernels the test session keeps running on purpose (conftest's `shared_kernel`): each
# one is kept, with its own warm forkserver and resource tracker, but never what they started.
SHARED_KERNELS: set[int] = set()
_KEEPER_MAINS = ("multiprocess.forkserver import main", "multiprocess.resource_tracker import main")


def _exiting(pid: int) -> bool:
    """The process is on its way out (PF_EXITING in /proc/PID/stat's flags, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & 0x4)
    except (OSError, IndexError, ValueError):
        return True  # gone already


def keepers() -> set[int]:
    """Processes mpify keeps on purpose between launches: the warm forkservers and the resource
    tracker of multiprocess; and the session's shared kernel with its own of them."""
    pids = set(SCRIPT_SERVERS)
    try:
        from multiprocess import resource_tracker

        from mpify.engine.start import pool
        pids |= pool.server_pids()
        if resource_tracker._resource_tracker._pid:
            pids.add(resource_tracker._resource_tracker._pid)
    except Exception:
        pass
    for kernel in SHARED_KERNELS:
        try:
            proc = psutil.Process(kernel)
            children, argv = proc.children(), proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        pids.add(kernel)
        for child in children:  # its ranks are the forkserver's children, never kept
            try:
                # A forkserver; or the kernel's zygote (the kernel forked into a forkserver, so
                # the kernel's own command line), which serves until a forkserver is ready and
                # exits a moment after that, once its last ranks have.
                # A kernel's child that is exiting is one of those, retired (a forkserver once
                # a complete one is ready): ranks are a forkserver's or the zygote's children.
                line = child.cmdline()
                if any(m in " ".join(line) for m in _KEEPER_MAINS) or line == argv or _exiting(child.pid):
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
    return pids


def strays(root: int | None = None) -> list[psutil.Process]:
    """Descendants of `root` (default: this process) other than the keepers, still running."""
    root_proc = psutil.Process(root or os.getpid())
    keep = keepers()
    out = []
    for p in root_proc.children(recursive=True):
        try:
            if p.pid not in keep and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def described(procs: list[psutil.Process]) -> list[tuple]:
    """Strays as an assertion shows them: pid, parent, command line."""
    out = []
    for p in procs:
        try:
            out.append((p.pid, p.ppid(), p.cmdline()[:4]))
        except psutil.NoSuchProcess:
            out.append((p.pid, "gone"))
    return out


def alive(pids) -> list[int]:
    """Which of `pids` (or members of their process groups) are still running."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.pid in pids or os.getpgid(p.pid) in pids:
                found.append(p.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return found


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = alive(pids)
        if not left:
            return []
        time.sleep(0.05)
    return alive(pids)


def python_script(tmp_path, text: str, name: str = "launcher.py"):
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, "-u", str(path)]


def die_with_parent() -> None:
    """preexec_fn for launcher subprocesses: if the test process is killed (a timeout), the
    launcher gets SIGKILL too, and its ranks follow it (their watchdogs), so nothing is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def parallel(*calls):
    """Call each of `calls` (no arguments) in a thread of its own and return their results in
    order: for independent fresh interpreters (a slice and the whole notebook, say), which then
    start side by side instead of one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


# The server of ForkedScripts: imports torch once, then runs each script it is sent in a child
# forked for it, as `python script.py` would run it (see ForkedScripts).
_SCRIPT_SERVER = r"""
import importlib, json, os, runpy, sys, traceback
import torch  # what a fresh interpreter's `import torch` loads; nothing else of the tests
replies = os.fdopen(os.dup(1), "w", buffering=1)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 1)  # only the replies go back on the pipe
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import ctypes, signal
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: dies with the server
            for fd, path in ((1, req["out"]), (2, req["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.stdin = open(os.devnull)
            os.chdir(req["cwd"])
            sys.argv = [req["script"]]
            sys.path[0] = os.path.dirname(req["script"])
            importlib.invalidate_caches()
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    # The timeout is kept here, by the child's parent, through a pidfd: the child cannot be
    # reaped (and its pid given to another process) before the kill, which a kill by pid from
    # the test process could not promise.
    import select, signal
    pidfd = os.pidfd_open(pid)
    late = not select.select([pidfd], [], [], req["timeout"])[0]
    if late:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    replies.write(f"{os.waitstatus_to_exitcode(status)} {int(late)}\n")
"""


class ForkedScripts:
    """Runs scripts that import torch as `python script.py` does (their own `__main__`, sys.argv,
    sys.path[0] and working directory, stdout and stderr), each in a child forked from one
    process that imported torch once: a fresh interpreter's `import torch` costs 3 s of CPU, and
    the slice tests run two scripts each. What the child starts with beyond a fresh interpreter
    is only what `import torch` itself loads; a script that lacks an import of its own still
    fails on the name. One script at a time; the server dies with the test process."""

    def __init__(self):
        import subprocess

        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", _SCRIPT_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        # It ends when its stdin does, with the test process (die_with_parent would end it with the
        # thread that started it: PR_SET_PDEATHSIG follows the parent thread, and tests call from pools).
        SCRIPT_SERVERS.add(self.proc.pid)

    def run(self, script, cwd, timeout: float = 120):
        """(returncode, stdout, stderr) of `script` run in `cwd`."""
        import json
        import tempfile

        with self.lock, tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            self.proc.stdin.write(json.dumps({"script": str(script), "cwd": str(cwd), "out": out, "err": err,
                                              "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            # One line, "<exit code> <1 if killed at the timeout>": the server kills a script that
            # runs past it. (This process once waited for the line with select() on the pipe
            # after a buffered readline had already taken it, then killed the script's pid long
            # after the script had exited: whatever process or thread had that pid by then.)
            reply = self.proc.stdout.readline().split()
            if not reply:
                raise AssertionError(f"the script server died running {script}")
            code, late = int(reply[0]), reply[1] == "1"
            with open(out) as fo, open(err) as fe:
                stdout, stderr = fo.read(), fe.read()
            if late:
                raise AssertionError(f"{script} ran past {timeout} s\n{stderr[-3000:]}")
            return code, stdout, stderr


SCRIPT_SERVERS: set[int] = set()  # keepers: a ForkedScripts server lives as long as the session
_forked_scripts: ForkedScripts | None = None


def forked_scripts() -> ForkedScripts:
    """The session's ForkedScripts, started at first use."""
    global _forked_scripts
    with _FORKED_SCRIPTS_LOCK:  # a slice and its whole notebook ask from two threads at once
        if _forked_scripts is None or _forked_scripts.proc.poll() is not None:
            _forked_scripts = ForkedScripts()
        return _forked_scripts


_FORKED_SCRIPTS_LOCK = threading.Lock()

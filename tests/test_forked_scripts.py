"""The test helper that runs slice scripts (helpers.ForkedScripts): its results and its timeout.

Why tests of a helper: it once waited for a script's exit code with select() on a pipe whose line a
buffered readline had already taken, so a script that finished before the caller read its pid
looked hung; at the timeout the caller then killed the script's pid, by then any process's or
thread's, and pytest-timeout ended the whole worker. Its timeout is now kept by the server, the
script's parent, through a pidfd.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from helpers import ForkedScripts


@pytest.fixture(scope="module")
def server():
    scripts = ForkedScripts()
    yield scripts
    scripts.proc.stdin.close()
    scripts.proc.wait(timeout=30)


def test_a_script_runs_as_python_runs_it(server, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(os.getcwd(), sys.argv[0], __name__)\n"
                      "print('to stderr', file=sys.stderr)\nsys.exit(3)\n")
    code, out, err = server.run(script, tmp_path, timeout=60)
    assert (code, out, err) == (3, f"{tmp_path} {script} __main__\n", "to stderr\n")


def test_quick_scripts_from_two_threads_all_answer_at_once(server, tmp_path):
    """Forty scripts that end at once, asked for from two threads: each answer arrives (none waits
    for its timeout)."""
    script = tmp_path / "quick.py"
    script.write_text("print('done')\n")
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: server.run(script, tmp_path, timeout=20), range(40)))
    assert results == [(0, "done\n", "")] * 40
    assert time.monotonic() - t0 < 20


def test_a_script_past_its_timeout_is_killed_and_reported(server, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"slow.py ran past 1 s"):
        server.run(script, tmp_path, timeout=1)
    assert time.monotonic() - t0 < 10
    assert psutil.Process(server.proc.pid).children() == []  # killed and reaped by the server
    assert server.run(_write(tmp_path, "after.py", "print(1)\n"), tmp_path, timeout=20)[:2] == (0, "1\n")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path

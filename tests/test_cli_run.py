"""`mpify run` as a user runs it: the installed console script, on the sample notebooks. Results and
exit codes, tracebacks that name notebook cells, one-line user errors, Ctrl-C; after each, nothing
left in the temp root (a TMPDIR of the test's own) and no process left in the command's session."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from export_helpers import MPIFY, SAMPLES, env_with_tmp, mpify, short_tmp, wait_session_gone

HELLO = str(SAMPLES / "hello_ranks.ipynb")
LOADER = str(SAMPLES / "dataloader_workers.ipynb")
DDP = str(SAMPLES / "ddp_train.ipynb")



def test_rank0_value_printed_and_every_rank_runs(tmpdir_, no_strays):
    r = mpify("run", HELLO, "--fn", "greet", "-n", "3", "--", "--name", "Ada", "--times", "2", tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == repr(["hello Ada from rank 0 of 3"] * 2)
    assert "hello from rank 0 of 3" in lines
    assert "[rank 1] hello from rank 1 of 3" in lines and "[rank 2] hello from rank 2 of 3" in lines
    assert r.stderr == ""


def test_json_and_show_ranks(tmpdir_, no_strays):
    r = mpify("run", HELLO, "--fn", "greet", "-n", "2", "--json", "--show-ranks", "none", tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    assert "[rank 1]" not in r.stdout
    assert json.loads(r.stdout.splitlines()[-1]) == ["hello world from rank 0 of 2"]


def test_ddp_sample_trains_on_two_ranks_and_prints_a_short_summary(tmpdir_, no_strays):
    """README's first command, as written: rank 0's value is something a person reads (the
    losses, the model's layers), not a screenful of tensor digits. Its one launch forks the
    command itself (the zygote), and no forkserver is started for launches that never come (it
    would import torch beside the ranks): the launch's events (MPIFY_DEBUG) say so."""
    r = mpify("run", DDP, "--fn", "train", "-n", "2", "--ddp", tmpdir=tmpdir_, env={"MPIFY_DEBUG": "1"})
    assert r.returncode == 0, r.stderr
    assert "forked the caller as forkserver" in r.stderr and "starting," not in r.stderr, r.stderr
    first, *model = r.stdout.splitlines()
    summary = re.fullmatch(r"\{'world_size': 2, 'losses': (\[.*\]), 'final_loss': ([0-9.]+), 'model': Sequential\(", first)
    assert summary, first
    losses, final = eval(summary[1]), float(summary[2])
    assert len(losses) == 3 and losses[-1] < losses[0] and final < losses[0]
    assert model == ["  (0): Linear(in_features=16, out_features=32, bias=True)", "  (1): ReLU()",
                     "  (2): Linear(in_features=32, out_features=1, bias=True)", ")}"]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_over_a_notebook_class_in_every_rank(tmpdir_, no_strays, start_method):
    # spawn workers import the notebook's Dataset class by reference from the payload module
    r = mpify("run", LOADER, "--fn", "loader_sum", "-n", "2", "--", "--start-method", start_method,
              tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "rank 0: sum 85344.0 from 2 workers" in lines
    assert "[rank 1] rank 1: sum 85344.0 from 2 workers" in lines
    assert lines[-1] == repr({"rank": 0, "sum": 85344.0, "workers": 2})


@pytest.mark.parametrize("bad_rank", [1, 0])  # a child rank, and the caller's own rank 0
def test_target_raised_traceback_names_notebook_cells(tmpdir_, no_strays, bad_rank):
    r = mpify("run", HELLO, "--fn", "check_rank", "-n", "2", "--", "--bad-rank", str(bad_rank), tmpdir=tmpdir_)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "Traceback (most recent call last):",
        f'  File "{HELLO}", cell 4, line 5, in check_rank',
        '    raise ValueError(f"rank {rank} is the bad one")',
        f"ValueError: rank {bad_rank} is the bad one",
        f"mpify: raised in rank {bad_rank} of 2; failed ranks: {bad_rank}",
    ]


def test_error_in_a_notebook_top_level_statement(tmp_path, tmpdir_, no_strays):
    nb = tmp_path / "top.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("import json\n\nCONFIG = json.loads('{bad')"),
                                       new_code_cell("def f():\n    return CONFIG")]), str(nb))
    r = mpify("run", nb, "--fn", "f", tmpdir=tmpdir_)
    assert r.returncode == 1
    assert f'File "{nb}", cell 1, line 3, in <module>\n    CONFIG = json.loads(\'{{bad\')' in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("json.decoder.JSONDecodeError: ")


def _notebooks(tmp_path):
    bad_json = tmp_path / "bad.ipynb"
    bad_json.write_text('{"cells": [')
    undefined = tmp_path / "undefined.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("def f():\n    return helper(2)")]), str(undefined))
    broken = tmp_path / "broken.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("def helper(x:\n    return x"),
                                       new_code_cell("def f():\n    return helper(2)")]), str(broken))
    return {"missing": tmp_path / "missing.ipynb", "bad_json": bad_json, "undefined": undefined,
            "broken": broken}


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--fn", "f"], "{nb}: no such file"),
    ("bad_json", ["--fn", "f"], "{nb}: is not JSON ("),
    ("hello", ["--fn", "gret"], "`gret` is not defined in {nb}; did you mean `greet`?"),
    ("undefined", ["--fn", "f"], "`helper` is used by `f` (cell 1, line 2) but nothing defines it before that"),
    ("broken", ["--fn", "f"], "cell 1 does not parse (line 1: "),
    ("hello", ["--fn", "greet", "--", "--times", "x"],
     "bad arguments for `greet` (after --): argument --times: invalid int value: 'x'"),
    ("hello", ["--fn", "greet", "--", "--nme", "Ada"], "bad arguments for `greet` (after --): unrecognized arguments: --nme Ada"),
    ("hello", ["--fn", "greet", "--backend", "gloo"], "--backend needs --ddp"),
    ("hello", ["--fn", "greet", "--show-ranks", "some"], "--show-ranks takes all, none or rank numbers"),
    ("hello", ["--fn", "greet", "-n", "0"], "-n must be at least 1, got 0"),
    ("hello", ["--fn", "greet", "--cell", "99"], "--cell 99 is out of range"),
    # click's own parse errors: one line too, not a usage box
    ("hello", ["--fn", "greet", "--name", "Ada"],
     "No such option: --name (Possible options: --fn); the target's own options go after `--`"),
    ("hello", ["--fn", "greet", "-n", "x"], "Invalid value for '-n' / '--nprocs': "),
    ("hello", ["--fn"], "Option '--fn' requires an argument; `mpify run --help` lists its options"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, tmpdir_, no_strays, case, args, message):
    nb = str(_notebooks(tmp_path).get(case, HELLO))
    r = mpify("run", nb, *args, tmpdir=tmpdir_)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpify: error: "), r.stderr
    assert message.format(nb=nb) in lines[0]
    assert "Traceback" not in r.stderr


def test_two_nodes_of_two_ranks(tmpdir_, no_strays):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [MPIFY, "run", HELLO, "--fn", "rank_sum", "--ddp", "-n", "2", "--nnodes", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank"]
    nodes = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_with_tmp(tmpdir_), start_new_session=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert outs[0][0] == repr({"world_size": 4, "sum": 10.0}) + "\n"  # 1 + 2 + 3 + 4
    assert outs[1][0] == ""  # only global rank 0 prints the value
    assert [wait_session_gone(p.pid) for p in nodes] == [[], []]


def test_target_help_lists_its_options(tmpdir_, no_strays):
    r = mpify("run", DDP, "--fn", "train", "--", "--help", tmpdir=tmpdir_)
    assert r.returncode == 0
    assert "--epochs EPOCHS" in r.stdout and "int (default: 3)" in r.stdout
    assert "--batch-size BATCH_SIZE" in r.stdout and "Train with DDP" in r.stdout


def test_ctrl_c_exits_130_and_leaves_nothing(tmpdir_):
    p = subprocess.Popen([MPIFY, "run", HELLO, "--fn", "nap", "-n", "2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env_with_tmp(tmpdir_), start_new_session=True)
    try:
        seen, deadline = [], time.monotonic() + 120
        while "[rank 1] napping" not in seen and time.monotonic() < deadline:
            seen.append(p.stdout.readline().rstrip("\n"))
        assert "[rank 1] napping" in seen and any(n.startswith("mpify-run-") for n in os.listdir(tmpdir_))
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 130
        assert time.monotonic() - t0 < 10
        assert err.strip().splitlines()[-1] == "mpify: interrupted"
        assert wait_session_gone(p.pid) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_reader_that_goes_away_never_hangs_the_run(tmpdir_):
    """`mpify run ... 2>&1 | head -3` with MPIFY_DEBUG=1: once the reader has gone, writing a debug
    line fails; that killed the launch's supervisor thread and the run waited forever for it."""
    env = dict(env_with_tmp(tmpdir_), MPIFY_DEBUG="1")
    p = subprocess.Popen([MPIFY, "run", SAMPLES / "hello_ranks.ipynb", "--fn", "rank_sum", "-n", "2", "--ddp"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        for _ in range(3):  # as `head -3`: read three lines, then go away
            p.stdout.readline()
        p.stdout.close()
        p.wait(timeout=60)
        assert wait_session_gone(p.pid) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_run_notebook_from_python(tmp_path, monkeypatch, no_strays):
    import mpify

    tmpdir_ = tmp_path / "tmproot"
    tmpdir_.mkdir()
    monkeypatch.setenv("TMPDIR", short_tmp(tmpdir_))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert mpify.run_notebook(HELLO, "greet", 2, kwargs={"name": "Bo"}) == ["hello Bo from rank 0 of 2"]
    assert mpify.run_notebook(LOADER, "loader_sum", 2, gather=True) == [
        {"rank": 0, "sum": 85344.0, "workers": 2}, {"rank": 1, "sum": 85344.0, "workers": 2}]
    with pytest.raises(ValueError, match="rank 1 is the bad one") as ei:
        mpify.run_notebook(HELLO, "check_rank", 2)
    assert ei.value.mpify_rank == 1
    assert f'File "{HELLO}", cell 4, line 5, in check_rank' in ei.value.__cause__.text
    with pytest.raises(mpify.ExportError):
        mpify.run_notebook(HELLO, "greet", backend="gloo")
    monkeypatch.setattr("tempfile.tempdir", None)
    # The payload's dir is gone (a forkserver this test may have started keeps its socket dir;
    # torch._dynamo, which it preloads, makes torch's own cache dir, torchinductor_<user>).
    assert [n for n in os.listdir(tmpdir_) if not n.startswith(("pymp-", "torchinductor_"))] == []


ASYNC_LISTS = ("import asyncio\nfrom typing import Optional\n\n"
               "async def total(sizes: list[int], limit: Optional[int] = 3, names: list[str] = ()):\n"
               "    await asyncio.sleep(0.01)\n"
               "    return [sum(sizes), limit, list(names)]")


def test_list_none_and_async_targets_from_run_and_from_the_export(tmp_path, no_strays):
    nb = tmp_path / "opts.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(ASYNC_LISTS)]), str(nb))
    opts = ["--sizes", "3", "4", "--limit", "None", "--names", "a", "b"]
    r = mpify("run", nb, "--fn", "total", "-n", "2", "--json", "--", *opts, tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == [7, None, ["a", "b"]]
    r = mpify("export", nb, "--fn", "total", "-o", tmp_path / "total.py", tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    script = subprocess.run([sys.executable, str(tmp_path / "total.py"), *opts], capture_output=True, text=True,
                            timeout=120)
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == repr([7, None, ["a", "b"]])


def test_a_child_ranks_figure_goes_to_a_file_in_a_terminal(tmpdir_, tmp_path, no_strays):
    """`mpify run`: no cell to show a child rank's `plt.show()` in, so its figure is written as a
    PNG under mpify_figures/ in the ranks' working directory (the notebook's folder, as in its
    kernel) and its path printed; rank 0's figure is matplotlib's own business
    (a non-interactive backend here: nothing is written)."""
    nb = tmp_path / "plots.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(
        "import os\nimport matplotlib.pyplot as plt\n\n"
        "def draw():\n    rank = int(os.environ['RANK'])\n    plt.plot([0, 1], [rank, rank + 1])\n"
        "    plt.show()\n    return rank")]), str(nb))
    work = tmp_path / "work"
    work.mkdir()
    r = mpify("run", str(nb), "--fn", "draw", "-n", "2", tmpdir=tmpdir_, cwd=work)
    assert r.returncode == 0, r.stderr
    shown = re.findall(r"^\[rank 1\] figure: (.+\.png)$", r.stdout, re.M)
    assert len(shown) == 1, r.stdout
    path = shown[0]
    assert os.path.dirname(path) == str(tmp_path / "mpify_figures")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "mpify_figures") == [os.path.basename(path)]  # rank 0 wrote none

"""`mpify export`: the scripts of the sample notebooks run with python (world size 1) and with
torchrun (2 ranks, gloo; and 2 nodes x 2 ranks), giving what `mpify run` and ranch in a real kernel
give; overwrite protection; translated and refused magics; the committed example stays current."""
from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from export_helpers import ROOT, SAMPLES, TORCHRUN, leftovers, mpify, run_cmd
from helpers import parallel

# (notebook, function, --ddp, target options): each runs in seconds on CPU. (hello_ranks's
# `greet` is left out here: a plain function with options, as loader_sum is, and its torchrun run
# was 9 s of CPU; its script is checked by test_sample_scripts_compile_and_pass_pyflakes.)
CASES = [
    ("ddp_train.ipynb", "train", True, ["--epochs", "2", "--batch-size", "128"]),
    ("hello_ranks.ipynb", "rank_sum", True, []),
    ("dataloader_workers.ipynb", "loader_sum", False, ["--size", "32"]),
]


def _result(stdout: str) -> str:
    """What rank 0 printed as the result: everything after the target's own prints."""
    lines = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith(("[rank ", "rank ", "hello from "))]
    return "\n".join(lines)


def _export(tmp_path, nb, fn, ddp, name=None):
    out = tmp_path / (name or f"{fn}.py")
    r = mpify("export", SAMPLES / nb, "--fn", fn, "-o", out, *(["--ddp"] if ddp else []),
              tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    return out


def _kernel_values(tmp_path, kernel):
    """The same calls made from a notebook kernel: ranch / torchddp_launch over the cells, and
    mpify.run_notebook on another notebook."""
    cells = [c.source for c in nbformat.read(str(SAMPLES / "ddp_train.ipynb"), as_version=4).cells[1:5]]
    cells += [c.source for c in nbformat.read(str(SAMPLES / "hello_ranks.ipynb"), as_version=4).cells[1:6]]
    cells += [
        "from mpify import ranch, torchddp_launch\nimport mpify",
        'print("RESULT", repr(torchddp_launch(2, train, epochs=2, batch_size=128)))',
        'print("RESULT", repr(torchddp_launch(2, rank_sum)))',
        f'print("RESULT", repr(mpify.run_notebook({str(SAMPLES / "dataloader_workers.ipynb")!r}, '
        '"loader_sum", 2, kwargs={"size": 32})))',
    ]
    nb = new_notebook(cells=[new_code_cell(s) for s in cells])
    nb.metadata["kernelspec"] = {"name": kernel.kernel_name, "display_name": "t", "language": "python"}
    kernel.run(nb, tmp_path)
    values = []
    for c in nb.cells[-len(CASES):]:
        errors = [o for o in c.outputs if o.output_type == "error"]
        assert not errors, errors
        text = "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
        values.append(text[text.index("RESULT ") + 7:].rstrip("\n"))
    return values


def _case_jobs(tmp_path, nb, fn, ddp, opts, script, torchrun) -> dict:
    """The commands of one case, not yet run: `mpify run -n 2` and the script under torchrun;
    for a --ddp case also the script with plain python (world size 1) and `mpify run -n 1`. (A
    plain script as a world of one has a test of its own below; each command here is a few
    seconds of CPU, most of it importing torch.)"""
    ddp_opt = ["--ddp"] if ddp else []
    jobs = {
        "ran": lambda: mpify("run", SAMPLES / nb, "--fn", fn, "-n", "2", *ddp_opt, "--", *opts, tmpdir=tmp_path / "tmp"),
        "torchrun": lambda: torchrun([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()),
                                      script, *opts]),
    }
    if ddp:
        jobs["one"] = lambda: run_cmd([sys.executable, script, *opts], tmp_path / "tmp", cwd=tmp_path)
        jobs["ran1"] = lambda: mpify("run", SAMPLES / nb, "--fn", fn, *ddp_opt, "--", *opts, tmpdir=tmp_path / "tmp")
    return jobs


def test_exported_scripts_match_mpify_run_and_the_kernel(tmp_path, shared_kernel, no_strays):
    # Every command below is independent of the others: they run two at a time while the kernel
    # runs its notebook (each torchrun on a free master port of its own, not the default 29500).
    scripts = parallel(*[lambda nb=nb, fn=fn, ddp=ddp: _export(tmp_path, nb, fn, ddp) for nb, fn, ddp, _ in CASES])

    def torchrun(cmd):
        return run_cmd(cmd, tmp_path / "tmp", cwd=tmp_path)

    jobs = {}
    for (nb, fn, ddp, opts), script in zip(CASES, scripts):
        for what, job in _case_jobs(tmp_path, nb, fn, ddp, opts, script, torchrun).items():
            jobs[fn, what] = job
    with ThreadPoolExecutor(2) as pool:
        done = {key: pool.submit(job) for key, job in jobs.items()}
        kernel = _kernel_values(tmp_path, shared_kernel)
        out = {key: f.result() for key, f in done.items()}
    for (nb, fn, ddp, opts), in_kernel in zip(CASES, kernel):
        ran, tr = out[fn, "ran"], out[fn, "torchrun"]
        assert ran.returncode == 0, ran.stderr
        assert tr.returncode == 0, tr.stderr
        # ddp_train's value carries the trained model's loss on all the data (6 digits): the same
        # final weights under mpify run, torchrun and the kernel, not only the same losses
        assert _result(ran.stdout) == _result(tr.stdout) == in_kernel, fn
        if not ddp:
            continue
        one, ran1 = out[fn, "one"], out[fn, "ran1"]
        assert one.returncode == 0, one.stderr
        assert _result(one.stdout) == _result(ran1.stdout), fn
        if fn == "rank_sum":
            assert _result(one.stdout) == repr({"world_size": 1, "sum": 1.0})
            assert in_kernel == repr({"world_size": 2, "sum": 3.0})
    assert leftovers(tmp_path / "tmp") == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_run_one_script_world_size_4(tmp_path, no_strays):
    script = _export(tmp_path, "hello_ranks.ipynb", "rank_sum", True)
    port = _free_port()
    cmd = lambda node: [TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",  # noqa: E731
                        "--master-addr", "127.0.0.1", "--master-port", str(port), str(script)]
    from export_helpers import env_with_tmp
    env = env_with_tmp(tmp_path)
    nodes = [subprocess.Popen(cmd(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outs
    # only global rank 0 (on node 0) prints: 1 + 2 + 3 + 4
    assert outs[0][0].strip() == repr({"world_size": 4, "sum": 10.0})
    assert outs[1][0].strip() == ""


def test_script_help_and_bad_options(tmp_path):
    script = _export(tmp_path, "ddp_train.ipynb", "train", True)
    h, bad = parallel(*[lambda args=args: subprocess.run([sys.executable, script, *args], capture_output=True,
                                                          text=True, timeout=120)
                        for args in (["--help"], ["--epochs", "x"])])
    assert h.returncode == 0 and "--epochs EPOCHS" in h.stdout and "Train with DDP" in h.stdout
    assert bad.returncode == 2 and "argument --epochs: invalid int value: 'x'" in bad.stderr


def test_never_overwrites_without_force(tmp_path, no_strays):
    out = tmp_path / "greet.py"
    out.write_text("# mine\n")
    args = ["export", SAMPLES / "hello_ranks.ipynb", "--fn", "greet", "-o", out]
    r = mpify(*args, tmpdir=tmp_path / "tmp")
    assert r.returncode == 2 and r.stderr == f"mpify: error: {out} exists; use --force to overwrite it\n"
    assert out.read_text() == "# mine\n"
    r = mpify(*args, "--force", tmpdir=tmp_path / "tmp")
    assert r.returncode == 0 and out.read_text().startswith('"""`greet` from ')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greet.py", "tmp"]  # no temp file left


def test_default_output_next_to_the_notebook(tmp_path):
    nb = tmp_path / "nb.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("def f(x: int = 1):\n    return x * 2")]), str(nb))
    r = mpify("export", nb, "--fn", "f", "--ddp", tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f_ddp.py").exists()


def test_shell_capture_is_translated_and_said(tmp_path, no_strays):
    nb = tmp_path / "shell.ipynb"
    (tmp_path / "data_a.txt").write_text("")
    nbformat.write(new_notebook(cells=[new_code_cell("pattern = 'data_*.txt'\nfiles = !ls {pattern}"),
                                       new_code_cell("def count():\n    return len(files)")]), str(nb))
    out = tmp_path / "count.py"
    r = mpify("export", nb, "--fn", "count", "-o", out, tmpdir=tmp_path / "tmp")
    assert r.returncode == 0
    assert "mpify: warning: cell 1, line 2: `!ls {pattern}` translated to subprocess.getoutput" in r.stderr
    assert "# mpify: line 2: `!ls {pattern}` translated to subprocess.getoutput" in out.read_text()
    ran = subprocess.run([sys.executable, out], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.stdout == "1\n"


def test_untranslatable_magic_is_refused_with_cell_and_line(tmp_path, no_strays):
    nb = tmp_path / "magic.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("import time\nt = %timeit -o time.sleep(0)"),
                                       new_code_cell("def best():\n    return t.best")]), str(nb))
    out = tmp_path / "best.py"
    r = mpify("export", nb, "--fn", "best", "-o", out, tmpdir=tmp_path / "tmp")
    assert r.returncode == 2 and not out.exists()
    assert r.stderr == (f"mpify: error: {nb}: cell 1, line 2: `%timeit -o time.sleep(0)` cannot be "
                        "translated, and `best` needs it; compute the value in Python instead\n")


@pytest.mark.parametrize("args, message", [
    (["--fn", "trian"], "did you mean `train`?"),
    (["--fn", "train", "--backend", "gloo"], "--backend needs --ddp"),
])
def test_export_user_errors(tmp_path, args, message):
    r = mpify("export", SAMPLES / "ddp_train.ipynb", *args, "-o", tmp_path / "o.py", tmpdir=tmp_path / "tmp")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert not (tmp_path / "o.py").exists()


def test_committed_example_is_what_export_writes(tmp_path):
    """sample_notebooks/train_ddp.py (linked from the README) is the current export of the sample."""
    r = run_cmd([sys.executable, "-m", "mpify", "export", "sample_notebooks/ddp_train.ipynb", "--fn", "train",
                 "--ddp", "-o", tmp_path / "train_ddp.py"], tmp_path / "tmp", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "train_ddp.py").read_text() == (SAMPLES / "train_ddp.py").read_text()


RACE = ["import torch, torch.distributed as dist\nfrom torch.nn.parallel import DistributedDataParallel as DDP",
        "def train():\n    model = DDP(torch.nn.Linear(4, 4))\n    model(torch.randn(8, 4)).sum().backward()\n"
        "    for i in range(20):\n        dist.all_reduce(torch.ones(1))  # temporaries: gloo's workers free them\n"
        "    return 1"]


def test_exported_ddp_script_exits_cleanly_under_torchrun(tmp_path):
    # DDP keeps gloo's worker threads alive past destroy_process_group; one of them may still wait
    # for the GIL to free a temporary of the last all_reduce when the interpreter shuts down, and
    # CPython 3.11 kills it inside C++: SIGABRT after the work was done. Without the script's
    # pause after destroy, 7 of 20 such runs aborted here; with it, 0 of 20.
    nb = tmp_path / "race.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in RACE]), str(nb))
    script = tmp_path / "race.py"
    assert mpify("export", nb, "--fn", "train", "--ddp", "-o", script, tmpdir=tmp_path / "tmp").returncode == 0
    # One run of four ranks: four ranks' exits. Without the pause 35% of two-rank runs aborted
    # (about one rank exit in five), so these four catch its loss 3 times in 5; with this file's
    # other torchrun run of an exported DDP script (ddp_train, above) and test_cli_call.py's, which
    # exit the same way, eight DDP ranks' exits per suite catch it 5 times in 6.
    runs = [run_cmd([TORCHRUN, "--nproc-per-node", "4", "--master-port", str(_free_port()), script],
                    tmp_path / "tmp", cwd=tmp_path)]
    for tr in runs:
        assert tr.returncode == 0, tr.stderr[-2000:]


def test_a_plain_export_run_with_python_is_a_world_of_one(tmp_path):
    # Found by user testing: without --ddp the script set no RANK, unlike `mpify run -n 1`.
    nb = tmp_path / "env.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(
        "import os\ndef where():\n    return os.environ['RANK'], os.environ['WORLD_SIZE']")]), str(nb))
    script = tmp_path / "where.py"
    assert mpify("export", nb, "--fn", "where", "-o", script, tmpdir=tmp_path / "tmp").returncode == 0
    one = run_cmd([sys.executable, script], tmp_path / "tmp", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == repr(("0", "1"))

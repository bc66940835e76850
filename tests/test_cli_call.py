"""`--call`: running a notebook function whose parameters are the notebook's own objects.

On notebooks written like course notebooks (a helper module beside them brought in by a star
import, display cells, exploration, a superseded draft of the target, objects built in cells and
passed to it): `mpify run --call` with positional, keyword and attribute arguments on 2 ranks; the
exported script's main() making the same call under python and torchrun; the error for a missing
parameter, for every launcher form a notebook uses, naming the cell and printing the `--call` (and
`-n`) that replays it, pasted back and run; `run_notebook(call=...)`; the one-line refusals.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import SAMPLES, mpify, run_cmd

LESSON = "lesson_mlp.ipynb"

# ---- a torch-free course notebook: word counts, one shard per rank --------------------------------

TEXT_UTILS = '''\
"""Helpers for the text lessons: `from text_utils import *`."""
import re
from collections import Counter

LINES = [
    "The cat sat on the mat and the cat slept",
    "A dog barked at the cat from the garden",
    "The garden of the house was full of roses",
    "Roses are red and the sky is blue",
    "The dog and the cat are friends now",
    "A bird sang in the garden all morning",
    "The house on the hill has a red door",
    "Morning light on the roses and the mat",
]


def load_corpus():
    return list(LINES)


def tokenize(line):
    return re.findall(r"[a-z']+", line.lower())


class StopWords:
    """Words left out of the counts."""

    def __init__(self, words):
        self.words = set(words)

    def __contains__(self, word):
        return word in self.words

    def __repr__(self):
        return f"StopWords({sorted(self.words)})"


def show_sample(corpus, n=2):
    for line in corpus[:n]:
        print(">", line)
'''

# The final target: each rank counts its shard. Launchers that pass the process index get a
# signature that takes it first, as a notebook written for them does.
COUNT = '''\
def count_words(corpus, stop, top=3):
    """The `top` most common words of this rank's shard of the corpus."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    counts = Counter(w for line in corpus[rank::world] for w in tokenize(line) if w not in stop)
    return counts.most_common(top)'''
COUNT_RANK_FIRST = COUNT.replace("def count_words(corpus,", "def count_words(rank, corpus,").replace(
    'rank, world = int(os.environ.get("RANK", "0")), ', "world = ")

# form -> (launch cell, the target's def, expected stderr after the error line's "cell 11 ...: ")
LAUNCHES = {
    "call": ("count_words(corpus, stop, top=2)", COUNT),
    "ranch": ("from mpify import ranch\n\nranch(2, count_words, corpus, stop, top=2)", COUNT),
    "torchddp_launch": ("from mpify import torchddp_launch\n\ntorchddp_launch(2, count_words, corpus, stop, top=2)", COUNT),
    "in_torchddp": ("from mpify import in_torchddp\n\nin_torchddp(2, count_words, corpus, stop, top=2, gather=False)", COUNT),
    "notebook_launcher": ("from accelerate import notebook_launcher\n\n"
                          "notebook_launcher(count_words, (corpus, stop, 2), num_processes=2)", COUNT),
    "mp.spawn": ("import torch.multiprocessing as mp\n\nmp.spawn(count_words, args=(corpus, stop, 2), nprocs=2)",
                 COUNT_RANK_FIRST),
    "xmp.spawn": ("import torch_xla.distributed.xla_multiprocessing as xmp\n\n"
                  "xmp.spawn(count_words, args=(corpus, stop, 2), nprocs=2, start_method='fork')", COUNT_RANK_FIRST),
    "idist.Parallel.run": ("import ignite.distributed as idist\n\n"
                           "idist.Parallel(backend='gloo', nproc_per_node=2).run(count_words, corpus, stop, top=2)",
                           COUNT_RANK_FIRST),
    "with idist.Parallel": ("import ignite.distributed as idist\n\n"
                            "with idist.Parallel(backend='gloo', nproc_per_node=2) as parallel:\n"
                            "    parallel.run(count_words, corpus, stop, 2)", COUNT_RANK_FIRST),
}


def word_notebook(tmp_path, form: str):
    """The word-count lesson whose last code cell launches `count_words` the `form` way."""
    launch, target = LAUNCHES[form]
    cells = [
        new_markdown_cell("# Lesson 1: counting words, one shard per rank"),
        new_code_cell("import os\nfrom text_utils import *"),
        new_code_cell("corpus = load_corpus()\nlen(corpus), corpus[:2]"),
        new_code_cell("show_sample(corpus)"),
        new_markdown_cell("## A first count, the whole corpus at once"),
        new_code_cell("def count_words(corpus):\n"
                      "    return Counter(w for line in corpus for w in tokenize(line))"),
        new_code_cell("count_words(corpus).most_common(3)"),  # a call of the superseded draft
        new_markdown_cell("## Counting in parallel, without the stop words"),
        new_code_cell('stop = StopWords(["the", "a", "of", "on", "and"])\nstop'),
        new_code_cell(target),
        new_code_cell(launch),
        new_code_cell("print('done')"),
    ]
    (tmp_path / "text_utils.py").write_text(TEXT_UTILS)
    path = tmp_path / "words.ipynb"
    nbformat.write(new_notebook(cells=cells), str(path))
    return path


def expected_counts(tmp_path, rank=0, world=2, top=2):
    """What rank `rank` of `world` should return, computed here from the helper module itself."""
    spec = importlib.util.spec_from_file_location("text_utils_expected", tmp_path / "text_utils.py")
    tu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tu)
    stop = {"the", "a", "of", "on", "and"}
    counts = Counter(w for line in tu.LINES[rank::world] for w in tu.tokenize(line) if w not in stop)
    return [list(p) for p in counts.most_common(top)]


# ---- --call on the lesson notebook: positional, keyword and attribute arguments ------------------

def lesson_copy(tmp_path):
    """The sample lesson and its helper module, copied where a script can be written beside them."""
    for name in (LESSON, "course_utils.py"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    return tmp_path / LESSON


CALL = "train(model, cfg.epochs, lr=cfg.lr * 2)"


def _check_training(out, world):
    assert out["world_size"] == world and out["epochs"] == 3 and out["lr"] == 0.2
    assert len(out["losses"]) == 3 and out["losses"][0] > out["losses"][-1]
    assert out["accuracy"] > 0.9


def test_call_with_objects_runs_on_two_ranks_and_matches_the_exported_script_under_torchrun(tmp_path, tmpdir_):
    nb = lesson_copy(tmp_path)
    # `mpify run` beside the export and the script's two runs (independent commands, side by side)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(mpify, "run", nb, "--call", CALL, "-n", "2", "--ddp", "--json", tmpdir=tmpdir_)

        script = tmp_path / "train_ddp.py"
        e = mpify("export", nb, "--call", CALL, "--ddp", "-o", script, tmpdir=tmpdir_)
        assert e.returncode == 0, e.stderr
        text = script.read_text()
        assert f"def call_train():\n    \"\"\"`train` called as given to mpify with --call.\"\"\"\n    return {CALL}\n" in text
        assert "        result = call_train()\n" in text
        assert "It runs `train(model, cfg.epochs, lr=cfg.lr * 2)` (given with --call) and takes no options." in text
        # the call's names are sliced in as the target's own are; the superseded draft and its model are not
        assert "\ncfg = SimpleNamespace(epochs=3, lr=0.1, batch_size=64)\n" in text
        assert "\nmodel = make_mlp(16)\n" in text
        assert "linear_model" not in text and 'print(f"epoch {epoch}' not in text

        env_tmp = tmp_path / "scripttmp"
        singly = pool.submit(run_cmd, [sys.executable, script], env_tmp, cwd=tmp_path)
        torchrun = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            script], env_tmp, cwd=tmp_path)
        r, single = running.result(), singly.result()
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout.splitlines()[-1])
    _check_training(ran, 2)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    # the same slice, the same seeds, the same shards: the very numbers `mpify run` printed
    assert eval(torchrun.stdout.strip().splitlines()[-1]) == ran

    assert single.returncode == 0, single.stderr[-3000:]
    _check_training(eval(single.stdout.strip().splitlines()[-1]), 1)


# ---- the missing-parameter error, for each launcher form ----------------------------------------

REPLAYS = {
    "call": ("calls it: count_words(corpus, stop, top=2)", "call",
             "--call 'count_words(corpus, stop, top=2)' --cell 11"),
    "ranch": ("launches it: ranch(2, count_words, corpus, stop, top=2)", "launch",
              "--call 'count_words(corpus, stop, top=2)' --cell 11 -n 2"),
    "torchddp_launch": ("launches it: torchddp_launch(2, count_words, corpus, stop, top=2)", "launch",
                        "--call 'count_words(corpus, stop, top=2)' --cell 11 -n 2 --ddp"),
    "in_torchddp": ("launches it: in_torchddp(2, count_words, corpus, stop, top=2, gather=False)", "launch",
                    "--call 'count_words(corpus, stop, top=2)' --cell 11 -n 2 --ddp"),
    "notebook_launcher": ("launches it: notebook_launcher(count_words, (corpus, stop, 2), num_processes=2)",
                          "launch", "--call 'count_words(corpus, stop, 2)' --cell 11 -n 2"),
    "mp.spawn": ("launches it: mp.spawn(count_words, args=(corpus, stop, 2), nprocs=2)", "launch",
                 """--call 'count_words(int(os.environ["LOCAL_RANK"]), corpus, stop, 2)' --cell 11 -n 2"""),
    "xmp.spawn": ("launches it: xmp.spawn(count_words, args=(corpus, stop, 2), nprocs=2, start_method='fork')",
                  "launch", """--call 'count_words(int(os.environ["LOCAL_RANK"]), corpus, stop, 2)' --cell 11 -n 2"""),
    "idist.Parallel.run": ("launches it: idist.Parallel(backend='gloo', nproc_per_node=2).run(count_words, corpus, "
                           "stop, top=2)", "launch",
                           """--call 'count_words(int(os.environ["LOCAL_RANK"]), corpus, stop, top=2)' """
                           """--cell 11 -n 2"""),
    "with idist.Parallel": ("launches it: parallel.run(count_words, corpus, stop, 2)", "launch",
                            """--call 'count_words(int(os.environ["LOCAL_RANK"]), corpus, stop, 2)' --cell 11 -n 2"""),
}
RANK_NOTES = {"mp.spawn": "mp.spawn", "xmp.spawn": "xmp.spawn", "idist.Parallel.run": "idist.Parallel(...).run",
              "with idist.Parallel": "idist.Parallel(...).run"}


def _replay_args(stderr: str) -> list[str]:
    """The options the error says to add, as a shell would split them."""
    line = stderr.splitlines()[1]
    return shlex.split(line.split(", use ", 1)[1])


@pytest.mark.parametrize("form", list(LAUNCHES))
def test_missing_parameter_names_the_cell_and_prints_the_replay(tmp_path, tmpdir_, form):
    nb = word_notebook(tmp_path, form)
    r = mpify("run", nb, "--fn", "count_words", tmpdir=tmpdir_)
    assert r.returncode == 2 and r.stdout == ""
    where, what, options = REPLAYS[form]
    needs = "`rank`, `corpus`, `stop`" if LAUNCHES[form][1] is COUNT_RANK_FIRST else "`corpus`, `stop`"
    expected = [f"mpify: error: `count_words` needs {needs}, which the command line does not give; cell 11 {where}",
                f"mpify: to replay that {what}, use {options}"]
    if form in RANK_NOTES:
        expected.append(f"mpify: {RANK_NOTES[form]} passes the process index first; the replay reads it from "
                        "LOCAL_RANK, which every rank has")
    assert r.stderr.splitlines() == expected


@pytest.mark.parametrize("form", ["call", "notebook_launcher", "mp.spawn"])
def test_the_printed_replay_pasted_back_runs(tmp_path, tmpdir_, form):
    nb = word_notebook(tmp_path, form)
    r = mpify("run", nb, "--fn", "count_words", tmpdir=tmpdir_)
    assert r.returncode == 2
    options = _replay_args(r.stderr)
    if "-n" not in options:  # a plain call has no process count: run it on 2 ranks anyway
        options += ["-n", "2"]
    ok = mpify("run", nb, *options, "--json", tmpdir=tmpdir_)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1]) == expected_counts(tmp_path)


def test_export_warns_with_the_replay_when_options_cannot_give_the_objects(tmp_path, tmpdir_):
    nb = word_notebook(tmp_path, "notebook_launcher")
    r = mpify("export", nb, "--fn", "count_words", "-o", tmp_path / "count.py", tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    assert ("mpify: warning: `count_words` needs `corpus`, `stop`, which an option can only give as a Python "
            "literal; cell 11 passes the notebook's own: notebook_launcher(count_words, (corpus, stop, 2), "
            "num_processes=2); `--call 'count_words(corpus, stop, 2)' --cell 11` exports that call") in r.stderr.splitlines()


def test_export_with_call_runs_with_python(tmp_path, tmpdir_):
    nb = word_notebook(tmp_path, "call")
    out = tmp_path / "count.py"
    r = mpify("export", nb, "--call", "count_words(corpus, stop, top=2)", "-o", out, tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    done = run_cmd([sys.executable, out], tmp_path / "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert eval(done.stdout.strip().splitlines()[-1]) == [tuple(p) for p in expected_counts(tmp_path, world=1)]
    assert "count_words(corpus).most_common" not in out.read_text()  # the draft's call is not in the slice


def test_a_failing_call_names_the_call_and_the_notebook_cell(tmp_path, tmpdir_):
    nb = word_notebook(tmp_path, "call")
    r = mpify("run", nb, "--call", "count_words(None, stop)", "-n", "2", tmpdir=tmpdir_)
    assert r.returncode == 1
    frames = [ln for ln in r.stderr.splitlines() if ln.startswith(("  File", "Traceback", "TypeError", "mpify:"))]
    # Both ranks raise the same error; the report is the first one's, whichever rank that was (rank
    # 1 starts as soon as rank 0 when the caller is forked for it: engine/start/zygote.py).
    assert frames[:4] == ["Traceback (most recent call last):",
                          '  File "--call", line 1, in call_count_words',
                          f'  File "{nb}", cell 10, line 4, in count_words',
                          "TypeError: 'NoneType' object is not subscriptable"], frames
    assert frames[4:] in (["mpify: raised in rank 0 of 2; failed ranks: 0"],
                          ["mpify: raised in rank 1 of 2; failed ranks: 1"],
                          ["mpify: raised in rank 0 of 2; failed ranks: 0, 1"],
                          ["mpify: raised in rank 1 of 2; failed ranks: 0, 1"]), frames
    assert "    return count_words(None, stop)" in r.stderr.splitlines()


# ---- from Python ---------------------------------------------------------------------------------

def test_run_notebook_call_from_python(tmp_path, no_strays):
    from mpify import run_notebook
    from mpify.export import MissingArgumentsError

    nb = word_notebook(tmp_path, "notebook_launcher")
    got = run_notebook(nb, nprocs=2, call="count_words(corpus, stop, top=2)")
    assert [list(p) for p in got] == expected_counts(tmp_path)
    with pytest.raises(MissingArgumentsError) as info:
        run_notebook(nb, "count_words", 2, kwargs={"top": 2})
    assert str(info.value) == ("`count_words` needs `corpus`, `stop`, which were not given; cell 11 launches it "
                               "as `notebook_launcher(count_words, (corpus, stop, 2), num_processes=2)`: replay "
                               "that with call='count_words(corpus, stop, 2)', cell=11, nprocs=2")
    assert info.value.missing == ["corpus", "stop"] and info.value.site.cell == 11


# ---- refusals: one line, exit 2 ------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--call", "stop.words.add(1)"],
     "--call must call a notebook function by its name, like `train(model, 3)` or `train(model, cfg.epochs, "
     "lr=1e-3)`; `stop.words.add` is not a name"),
    (["--call", "count_words"],
     "--call 'count_words' is not a call; give one call of a notebook function, like `train(model, 3)` or "
     "`train(model, cfg.epochs, lr=1e-3)`"),
    (["--call", "count_words(corpus"],
     "--call 'count_words(corpus' does not parse ('(' was never closed); give one call, like `train(model, 3)` "
     "or `train(model, cfg.epochs, lr=1e-3)`"),
    (["--call", "count_word(corpus, stop)"],
     "`count_word` is not defined in {nb}; did you mean `count_words`?"),
    (["--call", "count_words(corpus, stops)"],
     "--call 'count_words(corpus, stops)' uses `stops`, which {nb} does not define"),
    (["--fn", "show_sample", "--call", "count_words(corpus, stop)"],
     "--fn show_sample and --call 'count_words(corpus, stop)' name different functions; --fn may be left out "
     "with --call"),
    (["--call", "count_words(corpus, stop)", "--", "--top", "2"],
     "--call gives all the arguments of the call; drop the options after -- (--top 2) or put them in the call"),
    ([], "say which function: --fn NAME, or --call 'NAME(args...)'"),
])
def test_bad_call_is_one_line(tmp_path, tmpdir_, args, message):
    nb = word_notebook(tmp_path, "call")
    r = mpify("run", nb, *args, tmpdir=tmpdir_)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"mpify: error: {message.format(nb=nb)}"]


@pytest.mark.parametrize("args, message", [
    ([], "say which function: --fn NAME, or --call 'NAME(args...)'"),
    (["--call", "stop.words.add(1)"],
     "--call must call a notebook function by its name, like `train(model, 3)` or `train(model, cfg.epochs, "
     "lr=1e-3)`; `stop.words.add` is not a name"),
])
def test_export_refuses_the_same_way_and_writes_nothing(tmp_path, tmpdir_, args, message):
    nb = word_notebook(tmp_path, "call")
    r = mpify("export", nb, *args, "-o", tmp_path / "out.py", tmpdir=tmpdir_)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"mpify: error: {message}"]
    assert not (tmp_path / "out.py").exists()


# ---- --faithful on the three commands ------------------------------------------------------------

def test_faithful_accepted_by_deps_run_and_export(tmp_path, tmpdir_):
    nb = word_notebook(tmp_path, "call")
    d = mpify("deps", nb, "--fn", "count_words", "--faithful", tmpdir=tmpdir_)
    assert d.returncode == 0, d.stderr
    # Where the notebook calls it (cell 11), the slice's point (issue 16).
    assert d.stdout.startswith(f"count_words (function) in {nb}, as of cell 11, line ")
    r = mpify("run", nb, "--call", "count_words(corpus, stop, top=2)", "-n", "2", "--faithful", "--json",
              tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == expected_counts(tmp_path)
    out = tmp_path / "count.py"
    e = mpify("export", nb, "--call", "count_words(corpus, stop, top=2)", "--faithful", "-o", out, tmpdir=tmpdir_)
    assert e.returncode == 0, e.stderr
    done = subprocess.run([sys.executable, out], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert eval(done.stdout.strip().splitlines()[-1]) == [tuple(p) for p in expected_counts(tmp_path, world=1)]

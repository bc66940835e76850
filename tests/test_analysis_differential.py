"""Differential test of the slicer: run the whole notebook in a real Jupyter kernel and call the
target there, then run only the rendered slice as a script (forked from a process that imported
torch and nothing else: helpers.ForkedScripts) and call the target: the results (reprs) must be
equal. Every rendered slice must also compile and pass pyflakes without an
undefined name (except names a star import may supply)."""
from __future__ import annotations

import glob
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers import forked_scripts
from mpify.analysis import load_notebook, render_source, slice_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = sorted(glob.glob(os.path.join(HERE, "..", "sample_notebooks", "*.ipynb")))
MARK = "MPIFY_RESULT="

# Cheap calls for the targets of the shared sample notebooks (no training): name -> [(target, expr)].
SAMPLE_CALLS = {
    "ddp_train.ipynb": [
        ("make_model", "[tuple(p.shape) for p in make_model().parameters()]"),
        ("Synthetic", "(len(Synthetic()), round(float(Synthetic().y.sum()), 4))"),
    ],
    "lesson_mlp.ipynb": [
        ("make_mlp", "[tuple(p.shape) for p in make_mlp(8).parameters()]"),
        # The initial weights come from torch's global generator. The slice leaves out the draws
        # of the notebook's exploration and of its first linear model (issue 11: draws by
        # statements not otherwise needed), so after the slice the generator is not where the
        # notebook left it: the call seeds first, as the README tells users to.
        ("train", "(set_seed(3), train(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)), 1))[1]"),
    ],
}

# Notebooks of our own, richer in tricky cases than the samples.
OWN = {
    "mutations_magics": ([
        "md:# mutations, magics, star import",
        "import random, math\n%load_ext autoreload\nfrom collections import *",
        "random.seed(1)\nCONFIG = {'scale': 2}\nitems = []",
        "%%time\nfor i in range(5):\n    items.append(random.randint(0, 100))",
        "# scale, then shift\ndef helper(v):\n    return v * CONFIG['scale'] + OFFSET",
        "CONFIG['scale'] = 3\nOFFSET = 1\nlog = []\nprint(items)",
        "def summarize(extra=0):\n    c = Counter(items)\n    return sorted(helper(v) for v in items)[:3], len(c) + extra, math.floor(math.pi)",
        "summarize()\nOFFSET = 10\nitems.sort()",
    ], [("summarize", "summarize(1)"), ("helper", "helper(5)")]),
    "classes_globals": ([
        "import functools\nREGISTRY = {}",
        "def register(name):\n    def deco(cls):\n        REGISTRY[name] = cls\n        return cls\n    return deco",
        "class Base:\n    scale = 1\n    def run(self, x):\n        return x * self.scale + BIAS",
        "@register('double')\nclass Double(Base):\n    scale = 2",
        "BIAS = 0.5\nstate = {'calls': 0}\ndef bump():\n    global COUNTER\n    COUNTER = state['calls'] + 10",
        "bump()\nalias = state\nalias['calls'] += 1",
        "square = lambda v: v ** POWER\nPOWER = 2",
        "def pipeline(xs):\n    out = []\n    for x in xs:\n        match x:\n            case int(n) if n > LIMIT:\n"
        "                out.append(square(n))\n            case _:\n                out.append(REGISTRY['double']().run(x))\n"
        "    return out, COUNTER, state",
        "LIMIT = 2\nif (total := sum(range(4))) > 3:\n    LIMIT = 1",
        "pipeline([1, 2, 3])",
    ], [("pipeline", "pipeline([0, 1, 2, 3])"), ("Double", "Double().run(4)")]),
    "files_shell": ([
        "%%writefile mpify_diff_helper.py\ndef triple(x):\n    return 3 * x",
        "import mpify_diff_helper\nimport os",
        "here = !echo hello",
        "def use(v):\n    return mpify_diff_helper.triple(v), list(here)",
        "use(2)",
    ], [("use", "use(4)")]),
}


def _build(cells):
    nb = new_notebook()
    for c in cells:
        nb.cells.append(new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c))
    return nb


def _kernel_results(nb, calls, kernel, cwd):
    """Run every cell of nb in a real kernel (the session's shared one, reset as a kernel started
    in `cwd`: conftest.SharedKernel), then evaluate each call there; return the reprs."""
    nb = nbformat.from_dict(nb)
    for _, expr in calls:
        nb.cells.append(new_code_cell(f"print({MARK!r} + repr({expr}))"))
    kernel.run(nb, cwd)
    out = []
    for cell in nb.cells[-len(calls):]:
        text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
        errs = [o for o in cell.outputs if o.get("output_type") == "error"]
        assert not errs, f"kernel call failed: {errs[0].get('ename')}: {errs[0].get('evalue')}"
        line = [ln for ln in text.splitlines() if ln.startswith(MARK)]
        out.append(line[-1][len(MARK):])
    return out


def _slice_script(path, target, expr, cwd):
    """The target's rendered slice, checked, then the call, written to a script of its own."""
    # The kernel evaluates the call after the whole notebook: the slice as of its end, not the
    # state of the notebook's own last run of the target (at_run, issue 16).
    sl = slice_notebook(path, target, at_run=False)
    src = render_source(sl)
    check_slice(sl, src)
    script = cwd / f"slice_{target}.py"
    script.write_text(src + f"\nprint({MARK!r} + repr({expr}))\n")
    return script


def _slice_result(script, cwd):
    """The call's repr after only the slice, run as a script of its own (helpers.ForkedScripts)."""
    returncode, out, err = forked_scripts().run(script, cwd, timeout=300)
    assert returncode == 0, f"{script.name} failed:\n{script.read_text()}\n{err}"
    return [ln for ln in out.splitlines() if ln.startswith(MARK)][-1][len(MARK):]


def check_slice(sl, src=None):
    """The rendered slice compiles, and pyflakes finds no undefined name except star-supplied ones."""
    from pyflakes import api, messages, reporter as rep

    src = src if src is not None else render_source(sl)
    compile(src, f"<slice of {sl.target}>", "exec")

    class Collect(rep.Reporter):
        def __init__(self):
            self.msgs = []

        def flake(self, msg):
            self.msgs.append(msg)

        def syntaxError(self, *a):
            raise AssertionError(f"pyflakes: syntax error {a}")

        def unexpectedError(self, *a):
            raise AssertionError(f"pyflakes: {a}")

    r = Collect()
    api.check(src, f"slice_{sl.target}.py", r)
    undefined = [m.message_args[0] for m in r.msgs if isinstance(m, messages.UndefinedName)]
    if sl.star_imports:
        # pyflakes reports names that may come from a star import as ImportStarUsage, not undefined.
        undefined = [n for n in undefined if n not in sl.unresolved]
    assert not undefined, f"undefined names {undefined} in slice of {sl.target}:\n{src}"


@pytest.mark.parametrize("name", sorted(OWN))
def test_own_notebooks(name, shared_kernel, tmp_path):
    cells, calls = OWN[name]
    nb = _build(cells)
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    _compare_kernel_and_slices(nb, path, calls, shared_kernel, tmp_path)


@pytest.mark.parametrize("path", SAMPLES, ids=[os.path.basename(p) for p in SAMPLES])
def test_sample_notebooks_slices_compile_and_pass_pyflakes(path):
    """Every function and class the sample defines slices into a module that compiles cleanly."""
    nb = load_notebook(path)
    from mpify.analysis.model import build_model

    targets = sorted({n for s in build_model(nb).statements if s.kind in ("function", "class")
                      for n in s.facts.defs})
    assert targets
    for t in targets:
        check_slice(slice_notebook(nb, t))


@pytest.mark.parametrize("path", [p for p in SAMPLES if os.path.basename(p) in SAMPLE_CALLS],
                         ids=[os.path.basename(p) for p in SAMPLES if os.path.basename(p) in SAMPLE_CALLS])
def test_sample_notebooks_differential(path, shared_kernel, tmp_path):
    calls = SAMPLE_CALLS[os.path.basename(path)]
    nb = nbformat.read(path, as_version=4)
    _compare_kernel_and_slices(nb, path, calls, shared_kernel, tmp_path)


def _compare_kernel_and_slices(nb, path, calls, kernel, tmp_path):
    """Each call evaluated after the whole notebook in a real kernel equals the same call after
    only the target's rendered slice, run in a fresh interpreter."""
    kdir, sdir = tmp_path / "kernel", tmp_path / "slice"
    kdir.mkdir()
    sdir.mkdir()
    # Helper modules beside the notebook (`from course_utils import *`) go beside both runs, as a
    # kernel started in the notebook's directory finds them.
    for helper in glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*.py")):
        for d in (kdir, sdir):
            shutil.copy(helper, d)
    scripts = [_slice_script(path, target, expr, sdir) for target, expr in calls]
    # The slices' fresh interpreters run while the kernel runs the notebook.
    with ThreadPoolExecutor(len(scripts)) as pool:
        sliced = [pool.submit(_slice_result, script, sdir) for script in scripts]
        expected = _kernel_results(nb, calls, kernel, kdir)
        for (target, _), want, got in zip(calls, expected, sliced):
            assert got.result() == want, target

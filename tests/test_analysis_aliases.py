"""The may-alias rules and the function summaries of issue 16, one small notebook each: the exact
statements kept, and the rendered slice run in a fresh interpreter, where the target must see
what the notebook gives it (the value is written beside each case, as the notebook computes it)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mpify.analysis import render_source, slice_notebook
from test_analysis_cases import make_nb, srcs

MARK = "MPIFY_RESULT="

# name: (cells, target, kept statements, the target's call, its value after the whole notebook)
CASES = {
    # A view, and a slice, share their object's memory: changing them changes it.
    "view": (["import numpy as np\nx = np.zeros(4)", "v = x.reshape(2, 2)\nv[0, 0] = 1.0",
              "row = x[1:3]\nrow += 5", "def f():\n    return x.tolist()"], "f",
             ["import numpy as np", "x = np.zeros(4)", "v = x.reshape(2, 2)", "v[0, 0] = 1.0",
              "row = x[1:3]", "row += 5", "def f():\n    return x.tolist()"], "f()", [1.0, 5.0, 5.0, 0.0]),
    # A change of a view made in the same expression.
    "view_call": (["import numpy as np\nx = np.zeros(4)\ny = np.zeros(2)",
                   "x.reshape(2, 2).fill(3.0)\nnp.asarray(y).fill(1.0)\n(x + 1).fill(0.0)",
                   "def f():\n    return x.tolist(), y.tolist()"], "f",
                  ["import numpy as np", "x = np.zeros(4)", "y = np.zeros(2)", "x.reshape(2, 2).fill(3.0)",
                   "np.asarray(y).fill(1.0)", "def f():\n    return x.tolist(), y.tolist()"], "f()",
                  ([3.0, 3.0, 3.0, 3.0], [1.0, 1.0])),
    # Fresh values share nothing: a list of the values, a copy, a deep copy, a length.
    "fresh": (["import copy\nimport numpy as np\nx = np.zeros(3)\ncfg = {'lr': 0.1}",
               "vals = x.tolist()\nvals.append(9)\nc = x.copy()\nc[0] = 7\nd = copy.deepcopy(cfg)\n"
               "d['lr'] = 1\nn = len(x)", "def f():\n    return x.tolist(), cfg"], "f",
              ["import numpy as np", "x = np.zeros(3)", "cfg = {'lr': 0.1}",
               "def f():\n    return x.tolist(), cfg"], "f()", ([0.0, 0.0, 0.0], {"lr": 0.1})),
    # A container holds its elements: a change of an element reaches them, a change of the
    # container does not; `c, d = b, a` binds each name to its own value.
    "container": (["a = [1]\nb = [2]", "pair = [a, b]\npair[0].append(3)\npair.append([4])",
                   "c, d = b, a\nd.append(5)", "def f():\n    return a"], "f",
                  ["a = [1]", "b = [2]", "pair = [a, b]", "pair[0].append(3)", "c, d = b, a", "d.append(5)",
                   "def f():\n    return a"], "f()", [1, 3, 5]),
    # An object built over another (a loader over a dataset) reaches it when it is changed.
    "wrapper": (["class Loader:\n    def __init__(self, data):\n        self.data = data",
                 "ds = [1, 2]\ndl = Loader(ds)\ndl.data.append(99)", "def f():\n    return ds"], "f",
                ["class Loader:\n    def __init__(self, data):\n        self.data = data", "ds = [1, 2]",
                 "dl = Loader(ds)", "dl.data.append(99)", "def f():\n    return ds"], "f()", [1, 2, 99]),
    # ...but a method not known to change anything changes the holder only: a lesson's training
    # through a learner is not a change of the data a later `train()` builds its own learner over.
    "holder_method": (["class Learner:\n    def __init__(self, dls, model):\n        self.dls, self.model = dls, model\n"
                       "    def fit(self, n):\n        self.model['w'] += n\n        return self",
                       "dls = [1, 2]\nlearn = Learner(dls, {'w': 0})\nlearn.fit(1)",
                       "def train(n=2):\n    return Learner(dls, {'w': 0}).fit(n).model, dls"], "train",
                      ["class Learner:\n    def __init__(self, dls, model):\n        self.dls, self.model = dls, model\n"
                       "    def fit(self, n):\n        self.model['w'] += n\n        return self", "dls = [1, 2]",
                       "def train(n=2):\n    return Learner(dls, {'w': 0}).fit(n).model, dls"], "train()",
                      ({"w": 2}, [1, 2])),
    # An iterator advanced with next(): a generator is its own iterator.
    "iterator": (["def batches():\n    yield from range(5)", "gen = batches()\nit = iter(gen)\nfirst = next(it)",
                  "def rest():\n    return list(gen)"], "rest",
                 ["def batches():\n    yield from range(5)", "gen = batches()", "it = iter(gen)",
                  "first = next(it)", "def rest():\n    return list(gen)"], "rest()", [1, 2, 3, 4]),
    # Inside a function, a local that shares a parameter: changing it changes the argument.
    "local_alias": (["def fill(d):\n    e = d\n    e['k'] = 1", "cfg = {}\nfill(cfg)",
                     "def f():\n    return cfg"], "f",
                    ["def fill(d):\n    e = d\n    e['k'] = 1", "cfg = {}", "fill(cfg)",
                     "def f():\n    return cfg"], "f()", {"k": 1}),
    # Calls of notebook functions are followed: `report` only prints what `norm` computes.
    "followed": (["def norm(xs):\n    return sum(xs) / len(xs)", "def report(xs):\n    print(norm(xs))",
                  "def add_one(xs):\n    xs.append(1)", "def twice(xs):\n    add_one(xs)\n    add_one(xs)",
                  "lst = [4]\nreport(lst)\ntwice(lst)", "def f():\n    return lst"], "f",
                 ["def add_one(xs):\n    xs.append(1)", "def twice(xs):\n    add_one(xs)\n    add_one(xs)",
                  "lst = [4]", "twice(lst)", "def f():\n    return lst"], "f()", [4, 1, 1]),
    # ...with the definitions of the call's time: the first `show(lst)` calls a pure helper, the
    # second the helper redefined to clear its argument.
    "late_binding": (["def helper(x):\n    return len(x)", "def show(x):\n    return helper(x)",
                      "lst = [1, 2]\nshow(lst)", "def helper(x):\n    x.clear()", "show(lst)",
                      "def f():\n    return lst"], "f",
                     ["def show(x):\n    return helper(x)", "lst = [1, 2]",
                      "def helper(x):\n    x.clear()", "show(lst)", "def f():\n    return lst"], "f()", []),
    # Recursion, direct or mutual, stays conservative: the arguments may change.
    "recursion": (["def walk(xs, n):\n    return xs if n == 0 else walk(xs, n - 1)",
                   "def even(xs, n):\n    return True if n == 0 else odd(xs, n - 1)",
                   "def odd(xs, n):\n    return False if n == 0 else even(xs, n - 1)",
                   "lst = [1]\nwalk(lst, 3)\neven(lst, 3)", "def f():\n    return lst"], "f",
                  ["def walk(xs, n):\n    return xs if n == 0 else walk(xs, n - 1)",
                   "def even(xs, n):\n    return True if n == 0 else odd(xs, n - 1)",
                   "def odd(xs, n):\n    return False if n == 0 else even(xs, n - 1)",
                   "lst = [1]", "walk(lst, 3)", "even(lst, 3)", "def f():\n    return lst"], "f()", [1]),
    # A comprehension's targets are elements of its iterable, at top level and in a function.
    "comprehension": (["rows = [[1], [2]]\ncols = [[3]]", "[r.append(0) for r in rows]",
                       "def reset(xs):\n    [x.clear() for x in xs]", "reset(cols)",
                       "def f():\n    return rows, cols"], "f",
                      ["rows = [[1], [2]]", "cols = [[3]]", "[r.append(0) for r in rows]",
                       "def reset(xs):\n    [x.clear() for x in xs]", "reset(cols)",
                       "def f():\n    return rows, cols"], "f()", ([[1, 0], [2, 0]], [[]])),
    # A notebook function's result may be a global it reads (through the functions it calls).
    "returned_global": (["MODEL = {'w': 0}", "def lookup():\n    return MODEL",
                         "def get_model():\n    return lookup()", "m = get_model()\nm['w'] = 1",
                         "def f():\n    return MODEL"], "f",
                        ["MODEL = {'w': 0}", "def lookup():\n    return MODEL", "def get_model():\n    return lookup()",
                         "m = get_model()", "m['w'] = 1", "def f():\n    return MODEL"], "f()", {"w": 1}),
    # A function that changes a global through a local alias of it.
    "global_alias": (["REG = []", "def grow():\n    alias = REG\n    alias.append(1)", "grow()",
                      "def f():\n    return REG"], "f",
                     ["REG = []", "def grow():\n    alias = REG\n    alias.append(1)", "grow()",
                      "def f():\n    return REG"], "f()", [1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_alias_and_summary_cases(name, tmp_path):
    cells, target, want, call, value = CASES[name]
    sl = slice_notebook(make_nb(tmp_path, cells), target)
    assert srcs(sl) == want
    script = tmp_path / "slice.py"
    script.write_text(render_source(sl) + f"\nprint({MARK!r} + repr({call}))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == MARK + repr(value)

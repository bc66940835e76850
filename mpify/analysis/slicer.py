"""The slice: the statements a target function (or class) needs, each with the reason it is there.

Why a backward closure over statements: a notebook is a sequence of top-level statements, and what
the target needs is what it reads, then what those statements read, and so on. Each name is resolved
against the statements before the point where it is read:

- definition-time reads of a statement at position j resolve before j;
- names a function body reads resolve at the point where the function is used: the export point
  (end of cell K; else just before the notebook's last run of the target, runpoint.py; else the
  end of the notebook) for the target and what it calls (late binding: in
  `x = 1; def f(): return x; x = 2` the slice of `f` holds `x = 2`), or position j for a function
  called while statement j runs.

Walking back from that point, an unconditional binding ends the walk; conditional bindings, weak
updates (`x += 1`, `import a.b`), conditional `del`s and mutations (`x.append(v)`, `x[k] = v`,
`random.seed(0)` for `random`) are kept and the walk goes on. A mutation through a name that may
share the object (`a = b; a.append(1)`, `opt.step()` for the model `opt` was built over) and a
backward through a tensor computed from it (`loss.backward()` for `coeffs`) are mutations of it
too: aliases.py records them as such. An unconditional `del x` before any binding makes `x`
unresolved.

Never included: statements that launch or call the target at module level (`ranch(4, train)`,
`mp.spawn(train)`, `train()`): they would run the target when the slice is imported. Display-only
statements (`df.head()`, `print(x)`, a bare name) are never included because they define and mutate
nothing. A name nothing defines is resolved against builtins (after the notebook's own definitions:
`sum = 5` shadows `sum`), then attributed to the star imports before it (kept), then to opaque
statements before it (kept, with a warning); otherwise it is an `UnresolvedNameError`.

`from __future__` imports before the export point are always kept (they change how the slice
compiles); `render_source` puts them first.

The slicer is one class, `_Slicer`, in three parts: this module is the closure (the work list, how a
name read at a point resolves to the statements that make it, why each statement is kept, the
statements that run the target and are never kept) and its driver; unresolved.py what is done with
a name no statement defines (builtins, star imports, opaque statements, else the error);
caveats.py the warnings about what the slice cannot vouch for. The result it returns, `Slice`, is
result.py's.
"""
from __future__ import annotations

import ast
import difflib
import gc
from bisect import bisect_left
from collections import deque
from types import SimpleNamespace

from mpify.analysis.caveats import _Caveats
from mpify.analysis.errors import (CellRangeError, SliceSyntaxError, UnknownTargetError,
                                   UnresolvedNameError)
from mpify.analysis.model import Model, Statement, build_model
from mpify.analysis.notebook import Notebook, load_notebook
from mpify.analysis.result import Slice, SliceItem, _q
from mpify.analysis.runpoint import last_run, replayed_run
from mpify.analysis.seeds import _Seeds, bare_seed
from mpify.analysis.unresolved import _UnresolvedNames

__all__ = ["slice_notebook"]


def slice_notebook(nb, target: str, upto_cell: int | None = None, *, extra_roots=(),
                   faithful: bool = False, at_run: bool = True, replay: str | None = None) -> Slice:
    """Slice what `target` needs out of `nb` (a path or a `Notebook`), as of the end of cell
    `upto_cell` (1-based, all cells counted) or of the notebook. `extra_roots`: names read at that
    point besides the target (the arguments of a `--call`), sliced in as the target's own are.

    at_run: without `upto_cell`, take the slice just before the notebook's last run of the target
    (a call or a launch after its last definition, runpoint.py), the state it ran in, unless an
    `extra_roots` name is only bound after that run (a `--call` of what later cells make: as of the
    end of the notebook); False: as of the end of the notebook. `replay`: the `--call` text; the
    notebook's last run that makes that very call is the point, else its last run of the target.

    faithful: the conservative reading, for bit-exact reproduction: star imports are not resolved
    (a call on a name one may supply may change it) and every random draw after the last seed is
    kept. By default a call changes state only if effects.py knows it does, and draws by
    statements that are otherwise not needed are left out.

    Raises UnknownTargetError, UnresolvedNameError, SliceSyntaxError, CellRangeError, NotebookError.
    """
    if not isinstance(nb, Notebook):
        nb = load_notebook(nb)
    # The model is tens of thousands of small acyclic objects (AST nodes, facts): the cyclic
    # collector's passes over them cost a quarter of the time and find nothing (the benchmark).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _slice(nb, target, upto_cell, extra_roots, faithful, at_run, replay)
    finally:
        if enabled:
            gc.enable()


def _slice(nb, target, upto_cell, extra_roots, faithful, at_run, replay=None) -> Slice:
    model = build_model(nb, faithful=faithful)
    run = None
    if upto_cell is not None:
        if not 1 <= upto_cell <= len(nb.cells):
            raise CellRangeError(f"--cell {upto_cell} is out of range: {nb.path} has "
                                 f"{len(nb.cells)} cells (1-{len(nb.cells)})")
        point = model.cell_end[upto_cell]
    else:
        point = len(model.statements)
        if not at_run:
            run = None
        elif replay is not None:
            run = replayed_run(model.statements, target, point, replay)
        else:
            run = last_run(model.statements, target, point)
        if run is not None and not _bound_before(model.statements, extra_roots, run.index):
            run = None  # a --call of what later cells make (a new model): as of the end
        if run is not None:
            point = run.index
    slicer = _Slicer(model, target, point, upto_cell)
    for name in extra_roots:
        slicer._push(name, point, "the --call expression")
    try:
        sl = slicer.run()
    except UnresolvedNameError as e:
        if run is None or "only defined later" not in str(e):  # not for want of later cells
            raise
        raise UnresolvedNameError(e.name, f"{e}; the slice is taken before {run.where()}, where the "
                                          f"notebook runs {_q(target)} (--cell K takes it as of "
                                          "a later cell)", e.cell, e.lineno) from None
    if run is not None:
        sl.run_at = (run.cell, run.lineno, run.source.splitlines()[run.lineno - run.source_lineno].strip())
    return sl


def _bound_before(statements: list, names, index: int) -> bool:
    """Whether a statement before position `index` binds each of `names`. A `--call` replays the
    notebook's own run of the target when the names it passes already exist there (issue 25:
    sliced as of the end, a replay kept the experiments and the inference of the cells after the
    call); a name only later cells bind means the user calls it with what they made."""
    missing = set(names)
    for s in statements[:index]:
        missing -= s.facts.defs.keys()
        if not missing:
            return True
    return not missing


def _import_by_name(s: Statement, needed: set) -> tuple[str, list]:
    """The source of import statement `s` keeping only the names in `needed` (issue 11: a whole
    `import pickle, gzip, torch, matplotlib as mpl` kept for `torch` failed with
    ModuleNotFoundError on a machine without matplotlib). The kept names go on the statement's
    first line; its other lines become blank, so every line still maps to its cell line. Comment
    lines above it stay. Returns (source, names it binds)."""
    node = s.node
    keep = [a for a in node.names if _bound(node, a) in needed]
    if len(keep) == len(node.names):
        return s.source, [_bound(node, a) for a in node.names]
    names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in keep)
    text = (f"import {names}" if isinstance(node, ast.Import)
            else f"from {'.' * (node.level or 0)}{node.module or ''} import {names}")
    lines = s.source.rstrip("\n").split("\n")
    lead = s.lineno - s.source_lineno  # comment lines above the statement
    span = len(lines) - lead
    out = lines[:lead] + [text] + [""] * (span - 1)
    return "\n".join(out).rstrip("\n") + "\n", [_bound(node, a) for a in keep]


def _bound(node, alias) -> str:
    """The name an import alias binds: `c` for `b as c`, `a` for `import a.b`."""
    if alias.asname:
        return alias.asname
    return alias.name.split(".")[0] if isinstance(node, ast.Import) else alias.name


class _Slicer(_UnresolvedNames, _Caveats, _Seeds):
    def __init__(self, model: Model, target: str, point: int, upto_cell):
        self.m = model
        self.st: list[Statement] = model.statements
        self.target = target
        self.point = point
        self.upto = upto_cell
        self.reasons: dict[int, list] = {}
        self.reason_keys: set = set()
        self.work: deque = deque()
        self.seen: set = set()
        self.unresolved_pending: list = []
        self.warnings: list = []
        self.star_names: set = set()
        self.ipython: dict = {}  # IPython builtin the slice uses -> where first (unresolved.py)
        self.star_mods: list = []
        self.excluded, self.downstream = self._exclusions()
        self.excluded_warned: set = set()
        self.import_names: dict = {}  # import statement index -> the names of it the slice needs
        self.import_whole: set = set()  # import statements needed for more than a name
        self.star_supply: dict = {}  # star import index -> {name: who needs it}
        self.star_indices = [s.index for s in self.st if s.facts.star_import is not None
                             and s.index not in self.excluded]
        self.draws_from = self._generator_families()  # seeds.py

    def _exclusions(self):
        """The statements that run the target (`ranch(4, train)`, `probs = [train(t) for t in
        ts]`), and those downstream of them: statements that read, when they run, a name one of
        them defined (`best = max(probs)`). Downstream statements go with the call (issue 11):
        keeping them would need the call's result, and the slice must not run the target.
        Returns (all excluded indices, {downstream index: (name read, index of the call)})."""
        t = self.target
        direct = {s.index for s in self.st if t in s.facts.launches or t in s.facts.called_now}
        tainted: dict = {}  # name -> the target-running statement its value comes from
        down: dict = {}
        for s in self.st:
            f = s.facts
            if s.index in direct:
                for n in f.defs:
                    tainted[n] = s.index
                continue
            read = next((n for n in f.uses_now if n in tainted), None)
            if read is not None and t not in f.defs:
                down[s.index] = (read, tainted[read])
                for n in f.defs:
                    tainted[n] = tainted[read]
                continue
            for n, strong in f.defs.items():
                if strong:
                    tainted.pop(n, None)
        return direct | set(down), down

    # ---- helpers ----------------------------------------------------------------------------
    def _desc(self, j: int) -> str:
        s = self.st[j]
        names = [n for n in s.facts.defs if not n.startswith("<")]
        if self.target in names:
            return _q(self.target)
        return ", ".join(_q(n) for n in names[:2]) if names else s.where()

    def _push(self, name, p, why, soft=False, where=None, p_late=None):
        """Need `name` as read at position p; if it is a function, its body runs at p_late."""
        p_late = self.point if p_late is None else p_late
        key = (name, p, p_late)
        if key in self.seen:
            return
        self.seen.add(key)
        self.work.append((name, p, why, soft, where, p_late))
        for g in self.draws_from.get(name, ()):
            # What is read of a seeded module's package may draw from its generators where it
            # runs (seeds.py); a seed call's own read of its module draws nothing.
            for at in {p, p_late}:
                if not (at < len(self.st) and bare_seed(self.st[at].node, g)):
                    self._push(f"<seeds:{g}>", at, why)

    def _include(self, j: int, reason: str | None, p_req: int, name: str | None = None):
        """Keep statement j for `reason` (None: the caller writes the reason later, as for star
        imports); `name`: the name it is kept for (an import statement keeps only those)."""
        new = j not in self.reasons
        rs = self.reasons.setdefault(j, [])
        # One reason per name and statement: the first requester is the informative one.
        key = (j, name)
        if reason is not None and reason not in rs and (name is None or key not in self.reason_keys):
            rs.append(reason)
            self.reason_keys.add(key)
        s = self.st[j]
        f = s.facts
        if s.kind == "import" and f.star_import is None:
            if name is not None and name in f.defs:
                self.import_names.setdefault(j, set()).add(name)
            else:
                self.import_whole.add(j)
        if not new and not f.uses_later:
            return  # nothing more to push (the common case of a statement needed again)
        desc = self._desc(j)
        if new:
            for u, ln in f.uses_now.items():
                # A function called while statement j runs reads its globals at j; one only
                # referenced there (a base class, a callback) is called later: at the export point.
                self._push(u, j, desc, where=(s.cell, ln),
                           p_late=j if u in f.called_now else self.point)
            for u, ln in f.soft_uses.items():
                self._push(u, j, desc, soft=True, where=(s.cell, ln))
        # Function bodies are read when the function is called: at p_req.
        for u, ln in f.uses_later.items():
            self._push(u, p_req, desc, where=(s.cell, ln), p_late=p_req)

    def _broken_between(self, name, lo, hi):
        for b in self.m.broken:
            if lo < b.position <= hi and name in b.names:
                return b
        return None

    # ---- resolution -------------------------------------------------------------------------
    def _resolve(self, name, p):
        """[(index, role)] of the statements that make `name` what it is when read at p, or a
        ('del', index) marker, or [] when nothing before p defines it."""
        ev = self.m.events.get(name, ())
        k = bisect_left(ev, p)
        found = []
        strong = -1
        deleted = None
        # A later seed of `name` was found: earlier draws from it do not matter. The seed call
        # itself reads `name` (to call `torch.manual_seed`), not the generator's state.
        seeded = p < len(self.st) and self.st[p].facts.mutates.get(name) == "seed"
        # A statement that is only a seed of every generator of `name` (`torch.manual_seed(42)`,
        # not `torch.cuda.manual_seed(42)`) makes the seeds before it irrelevant as well: a lesson
        # that seeds before each of its experiments keeps the last seed before the read, not all.
        whole = seeded and bare_seed(self.st[p].node, name) == "whole"
        for i in range(k - 1, -1, -1):
            j = ev[i]
            f = self.st[j].facts
            if j in self.excluded:
                if (name in f.defs or name in f.mutates) and j not in self.excluded_warned:
                    self.excluded_warned.add(j)
                    if j in self.downstream:
                        read, call = self.downstream[j]
                        self.warnings.append(
                            f"{self.st[j].where()}: reads {_q(read)}, which {self.st[call].where()} "
                            f"makes by running {_q(self.target)}; left out of the slice with it "
                            f"(downstream of the target), so {_q(name)} is not changed there")
                    else:
                        self.warnings.append(
                            f"{self.st[j].where()}: calls or launches {_q(self.target)} and changes "
                            f"{_q(name)}; left out of the slice (it would run the target on import)")
                continue
            if f.mutates.get(name) == "draw" and seeded and name not in f.defs:
                continue  # a draw before a seed: the seed redefines the generator's state
            if f.mutates.get(name) == "seed":
                bare = bare_seed(self.st[j].node, name)
                if whole and bare is not None:
                    continue  # a seed statement before a seed of every generator
                whole = whole or bare == "whole"
                seeded = True
            if f.defs.get(name) is True:
                found.append((j, "def"))
                strong = j
                break
            if f.dels.get(name) is True:
                deleted = j
                strong = j
                break
            if name in f.defs:
                found.append((j, "weak"))
            elif name in f.dels:
                found.append((j, "maydel"))
            elif name in f.mutates:
                found.append((j, f.mutates[name]))
        return found, deleted, strong

    def _reason(self, role, name, why, j):
        f = self.st[j].facts
        if role == "def" and name == self.target and why is None:
            return f"defines {_q(name)} (the target)"
        why = why or f"the target {_q(self.target)}"
        if name.startswith("<module:") or name.startswith("<file:"):
            return f"writes {self.st[j].file_write or name}, needed by {why}"
        if name.startswith("<fs:"):
            return f"writes files under {name[4:-1].strip(chr(34))}, which {why} reads"
        if role == "def":
            return f"defines {_q(name)}, needed by {why}"
        if role == "weak":
            if name in f.uses_now or name in f.mutates:
                return f"updates {_q(name)}, needed by {why}"
            return f"may define {_q(name)} (conditionally), needed by {why}"
        if role == "maydel":
            return f"may delete {_q(name)}, needed by {why}"
        if role == "state":
            return f"changes the state of module {_q(name)}, used by {why}"
        if role == "seed":
            what = f"the random state of module {_q(name)}" if self.st[j].node is not None and \
                self.m.kinds.get(name) == "module" else _q(name)
            return f"seeds {what} (earlier draws no longer matter), used by {why}"
        if role == "draw":
            return f"draws from {_q(name)} (kept for exact reproduction), used by {why}"
        if role == "called":
            return f"calls {_q(name)}, which may change it, needed by {why}"
        if role == "call-arg":
            return f"may mutate {_q(name)} (passes it to a call), needed by {why}"
        via = f.via.get(name)
        if role == "grad":
            return (f"writes the gradients of {_q(name)} (a backward through {_q(via)}, computed from "
                    f"it), needed by {why}")
        if via is not None:
            return f"changes {_q(via)}, which may share {_q(name)}, needed by {why}"
        return f"mutates {_q(name)}, needed by {why}"

    def _process(self, name, p, why, soft, where, p_late):
        if name.startswith("<seeds:"):
            return self._seeds(name[7:-1], p, why)
        soft = soft or name.startswith("<fs:")  # files: what wrote them, if anything (files.py)
        found, deleted, strong = self._resolve(name, p)
        b = self._broken_between(name, strong if deleted is None else deleted, p)
        if b is not None and not soft:
            raise SliceSyntaxError(
                b.cell, b.lineno,
                f"cell {b.cell} does not parse (line {b.lineno}: {b.message}) and may define "
                f"{_q(name)}, which {why or _q(self.target)} needs")
        for j, role in found:
            # The reason text only for the first requester of (statement, name): it is the one kept.
            reason = None if (j, name) in self.reason_keys else self._reason(role, name, why, j)
            self._include(j, reason, p_late, name)
        if deleted is not None and not found:
            if soft:
                return
            d = self.st[deleted]
            raise UnresolvedNameError(
                name, f"{_q(name)} is needed by {why} but is deleted ({d.where()}: `del {name}`) "
                      "and not defined again before it is used", d.cell, d.lineno)
        if not any(role in ("def", "weak") for _, role in found):
            # Mutations or a possible `del` alone do not define a name.
            self.unresolved_pending.append((name, p, why, soft, where, p_late))

    # ---- driver -----------------------------------------------------------------------------
    def _check_target(self):
        t = self.target
        defs = [s for s in self.st[:self.point] if t in s.facts.defs and s.index not in self.excluded]
        if defs:
            return
        b = self._broken_between(t, -1, self.point)
        if b is not None:
            raise SliceSyntaxError(b.cell, b.lineno, f"cell {b.cell} does not parse (line {b.lineno}: "
                                                     f"{b.message}) and may define the target {_q(t)}")
        later = [s for s in self.st[self.point:] if t in s.facts.defs]
        if later:
            raise UnknownTargetError(t, f"{_q(t)} is only defined at {later[0].where()}, after cell {self.upto}")
        names = {}
        for s in self.st[:self.point]:
            for n in s.facts.defs:
                if not n.startswith("<"):
                    names[n] = s.kind
        callables = [n for n, k in names.items() if k in ("function", "class", "lambda")]
        sugg = difflib.get_close_matches(t, callables, n=3, cutoff=0.6) or difflib.get_close_matches(
            t, list(names), n=3, cutoff=0.6)
        where = f" before the end of cell {self.upto}" if self.upto else ""
        raise UnknownTargetError(t, f"{_q(t)} is not defined in {self.m.notebook.path}{where}", sugg)

    def run(self) -> Slice:
        self._check_target()
        self._push(self.target, self.point, None, where=None)
        while True:
            while self.work:
                self._process(*self.work.popleft())
            added = self._settle_unresolved()
            added = self._star_state_calls() or added
            if not added and not self.work:
                break
        for s in self.st[:self.point]:
            node = s.node
            if s.kind == "import" and getattr(node, "module", None) == "__future__":
                self._include(s.index, "`from __future__` import: changes how the slice compiles",
                              self.point)
        while self.work:  # a __future__ import has no uses, but keep the loop honest
            self._process(*self.work.popleft())
        self._star_reasons()
        items = []
        for j in sorted(self.reasons):
            s = self.st[j]
            source, defines = s.source, [n for n in s.facts.defs if not n.startswith("<")]
            if j in self.import_names and j not in self.import_whole:
                source, defines = _import_by_name(s, self.import_names[j])
            items.append(SliceItem(s.cell, s.lineno, s.end_lineno, s.source_lineno, source,
                                   list(self.reasons[j]), s.kind, defines, j))
        self.warnings[:0] = [w for w in self.m.notebook.warnings if w not in self.warnings]
        self._warn(items)
        kind = self._target_kind()
        cells = sorted({i.cell for i in items})
        trace = SimpleNamespace(model=self.m, point=self.point, excluded=self.excluded,
                                downstream=self.downstream,
                                requests=frozenset((name, p) for name, p, _ in self.seen))
        return Slice(self.m.notebook, self.target, kind, self.upto, items, self.star_mods,
                     sorted(self.star_names), self.warnings, cells, ipython=self.ipython, trace=trace)

    def _target_kind(self) -> str:
        for s in reversed(self.st[:self.point]):
            if s.facts.defs.get(self.target) is not None and s.index in self.reasons:
                return {"function": "function", "class": "class", "lambda": "lambda",
                        "import": "import"}.get(s.kind, "variable")
        return "variable"

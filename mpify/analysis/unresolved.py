"""What the slicer does with a name no statement before its use defines.

Why a part of its own: the closure (slicer.py) resolves a name against the notebook's statements;
when none defines it, the answer comes from outside the notebook, in this order: a builtin or a
module attribute (nothing to keep); a name IPython injects (`display`, `get_ipython`: the slice's
text gets a stand-in, result.IPYTHON_STANDINS) or its input/output history
(an error); a star import that supplies it (kept, with one reason listing the names it supplies,
and the later bare seed or configuration calls it may supply: `from torch import *` then
`manual_seed(0)`); an opaque statement that may define it (kept, with a warning); read in the
body of a function that only a kept statement runs, not the target (`test(model)` before
training, whose `if verbose:` branch names an undefined `classes`): a warning, as the notebook
ran that statement without the name; else an `UnresolvedNameError` that says why (only defined
later, or only by a statement that runs the target), with the chain of functions from the target
to the one that reads the name (`train` -> `evaluate`). This class is a part of
`slicer._Slicer`; its methods use that class's state and helpers.
"""
from __future__ import annotations

import ast
import builtins
import re
from bisect import bisect_left
from collections import deque

from mpify.analysis.effects import BARE_STATE_CALLS
from mpify.analysis.errors import UnresolvedNameError
from mpify.analysis.result import _q

# Module attributes that exist in any module (and so in the exported script).
_MODULE_DUNDERS = frozenset({"__name__", "__doc__", "__builtins__", "__spec__", "__loader__",
                             "__package__", "__annotations__"})
# IPython's output/input history: they do not exist in a script (case 9).
_IPY_HISTORY = re.compile(r"^(_+|_\d+|_i+\d*|_[oid]h|In|Out)$")
# Names IPython injects that a plain script lacks: the slice's text defines a stand-in.
_IPY_INJECTED = frozenset({"display", "get_ipython"})


class _UnresolvedNames:
    """Names nothing in the notebook defines, and the star imports kept for them, in `slicer._Slicer`."""

    def _settle_unresolved(self) -> bool:
        """Builtins, star imports, opaque statements; else an error. True if work was added."""
        pending, self.unresolved_pending = self.unresolved_pending, []
        added = False
        for name, p, why, soft, where, p_late in pending:
            if soft or name.startswith("<"):
                continue
            if hasattr(builtins, name) or name in _MODULE_DUNDERS:
                continue
            loc = f"cell {where[0]}, line {where[1]}" if where else "the target"
            if name in _IPY_INJECTED:
                # The slice's text gets a stand-in (result.IPYTHON_STANDINS); the first use says where.
                self.ipython.setdefault(name, loc)
                continue
            if _IPY_HISTORY.match(name):
                raise UnresolvedNameError(
                    name, f"{_q(name)} ({loc}) is IPython's input/output history, which does not "
                          "exist outside the notebook; assign the value to a named variable instead",
                    *(where or (None, None)))
            stars = self._suppliers(name, p)
            if stars:
                self.star_names.add(name)
                for s in stars:
                    n0 = len(self.reasons)
                    self.star_supply.setdefault(s.index, {}).setdefault(name, why)
                    self._include(s.index, None, p)
                    added |= len(self.reasons) != n0
                    if s.facts.star_import not in self.star_mods:
                        self.star_mods.append(s.facts.star_import)
                continue
            opaque = [s for s in self.st[:p] if s.facts.opaque and s.index not in self.excluded]
            if opaque:
                for s in opaque:
                    n0 = len(self.reasons)
                    self._include(s.index, f"opaque ({s.facts.opaque}): may define {_q(name)}, "
                                           f"needed by {why}", p)
                    added |= len(self.reasons) != n0
                continue
            later = [s for s in self.st[p:] if name in s.facts.defs]
            hint = f"; it is only defined later, {later[0].where()}" if later else ""
            dropped = [s for s in self.st[:p] if name in s.facts.defs and s.index in self.excluded]
            if dropped:
                # Defined only by statements left out because they run the target (or read what
                # such a statement made): say that, not "nothing defines it".
                d = dropped[-1]
                how = (f"reads `{self.downstream[d.index][0]}`, which "
                       f"{self.st[self.downstream[d.index][1]].where()} makes by running "
                       f"{_q(self.target)}" if d.index in self.downstream
                       else f"runs {_q(self.target)}")
                raise UnresolvedNameError(
                    name, f"{_q(name)} is used by {why} ({loc}) but only {d.where()} defines it, and "
                          f"that statement {how}: the slice leaves it out; define {_q(name)} "
                          "without the target's result", *(where or (None, None)))
            reader = self._body_reader(name, where)
            if reader is not None and p < self.point and _runs_when_called(self.st[reader].node):
                # Read in the body of a function that a kept statement runs (`test(model)`, kept
                # as it changes `model`), not the target: the notebook ran that statement with
                # nothing defining the name, so the lines that read it did not run (a branch not
                # taken, `if verbose:`); they do not run in the slice either (issue 25: the
                # whole target was refused). Not for a class, a generator, or a function that
                # makes one that runs later (a method, a closure): the target may run that.
                w = (f"{loc}: {_q(name)} is used by {why} but nothing defines it before that{hint}; "
                     f"{why} runs at {self.st[p].where()}, not from {_q(self.target)}: kept as the "
                     f"notebook ran it, where the lines that read {_q(name)} cannot have run")
                if w not in self.warnings:
                    self.warnings.append(w)
                continue
            chain = self._chain_to(reader) if reader is not None else None
            path = (f", on the target's path {' -> '.join(_q(n) for n in chain)}," if chain and len(chain) > 1
                    else "")
            raise UnresolvedNameError(
                name, f"{_q(name)} is used by {why} ({loc}){path} but nothing defines it before that{hint}",
                *(where or (None, None)))
        return added

    def _body_reader(self, name, where):
        """The top-level statement (a def, class or lambda) whose body reads `name` at `where`
        ((cell, line)), or None when the read is the statement's own, as it runs."""
        if where is None:
            return None
        cell, line = where
        for s in self.st:
            if s.cell == cell and s.lineno <= line <= s.end_lineno:
                return s.index if name in s.facts.uses_later and s.facts.summaries else None
        return None

    def _chain_to(self, reader) -> list | None:
        """The names of the notebook functions from the target to the one statement `reader`
        defines, each read in the body of the one before (`train` -> `evaluate`): the kept
        definitions in force at the slice's point. None when the target's body does not lead
        there (a callback given to a kept statement, say)."""
        st, point = self.st, self.point
        start = next((j for j in sorted(self.reasons, reverse=True)
                      if j < point and self.target in st[j].facts.defs), None)
        if start is None:
            return None
        parent = {start: None}
        queue = deque([start])
        while queue:
            j = queue.popleft()
            if j == reader:
                chain = []
                while j is not None:
                    chain.append(self.target if parent[j] is None else parent[j][1])
                    j = parent[j][0] if parent[j] is not None else None
                return chain[::-1]
            for u in st[j].facts.uses_later:
                ev = self.m.events.get(u, ())
                k = next((k for k in reversed(ev[:bisect_left(ev, point)]) if k in self.reasons
                          and u in st[k].facts.defs and st[k].facts.summaries), None)
                if k is not None and k not in parent:
                    parent[k] = (j, u)
                    queue.append(k)
        return None

    def _suppliers(self, name, p) -> list:
        """The star imports before p that supply `name`: the last one whose module's source
        lists it (and any later one whose source is unknown or incomplete: it may override),
        else every one that may supply it. Never an empty list while a star import is there:
        a source read statically can miss a name (set through `sys.modules`, say), and keeping
        a star import is cheaper than a false error."""
        stars = [self.st[j] for j in self.star_indices[:bisect_left(self.star_indices, p)]]
        exp = self.m.stars
        known = [s for s in stars if s.index in exp and name in exp[s.index].names]
        if known:
            last = known[-1]
            return [last] + [s for s in stars if s.index > last.index
                             and not (s.index in exp and exp[s.index].found and exp[s.index].complete)]
        maybe = [s for s in stars if not (s.index in exp and exp[s.index].found and exp[s.index].complete)]
        return maybe or stars

    def _star_reasons(self) -> None:
        """One reason per kept star import, listing the names it supplies once."""
        for j, names in self.star_supply.items():
            exp = self.m.stars.get(j)
            whys = []
            for w in names.values():
                w = w or _q(self.target)
                if w not in whys:
                    whys.append(w)
            listed = ", ".join(_q(n) for n in sorted(names))
            verb = "supplies" if exp is not None and all(n in exp.names for n in names) else "may supply"
            more = f" and {len(whys) - 3} more" if len(whys) > 3 else ""
            self.reasons[j].insert(0, f"star import {verb} {listed}, needed by {', '.join(whys[:3])}{more}")
            if exp is None or not exp.found:
                s = self.st[j]
                where = "in faithful mode, star imports are not read" if self.m.faithful else (
                    f"no Python source for `{s.facts.star_import}` found here")
                self.warnings.append(
                    f"{s.where()}: `from {s.facts.star_import} import *`: {where}; the names it may "
                    "supply are read conservatively (a call on one may change it)")

    def _star_state_calls(self) -> bool:
        """`manual_seed(0)` after `from torch import *`: when the slice keeps a star import, it
        also keeps the later bare calls of seed/config functions that nothing in the notebook
        defines, as the star import may supply them and they change its module's state (the
        `torch.manual_seed(0)` rule, for names without their module). The same for such functions
        imported by name (`from transformers import set_seed`). True if work was added."""
        stars = sorted(j for j in self.reasons if self.st[j].facts.star_import is not None)
        imports = any(self.st[j].kind == "import" for j in self.reasons)
        if not stars and not imports:
            return False
        added = False
        for s in self.st[(stars[0] + 1 if stars else 0):self.point]:
            if s.index in self.excluded or s.index in self.reasons:
                continue
            for callee, _pos, _kws, _line in s.facts.calls:
                if callee not in BARE_STATE_CALLS:
                    continue
                binders = [i for i in self.m.events.get(callee, ()) if i < s.index
                           and callee in self.st[i].facts.defs]
                if binders:
                    # `from transformers import set_seed` then `set_seed(42)`: an imported seed or
                    # configuration function changes global state (the generators, the process
                    # environment with `load_dotenv()`), so it is kept whenever the slice uses a
                    # library at all. A notebook's own `seed` is its own function: not this rule.
                    b = self.st[binders[-1]]
                    if b.kind != "import" or not imports:
                        continue
                    self._include(s.index, f"calls {_q(callee)}, imported at {b.where()}: a seed or "
                                           "configuration call changes global state", self.point)
                    added = True
                    break
                if not stars:
                    continue
                before = [j for j in stars if j < s.index]
                known = [j for j in before if j in self.m.stars and callee in self.m.stars[j].names]
                if known:
                    mods, verb = _q(self.st[known[-1]].facts.star_import), "supplies"
                elif all(j in self.m.stars and self.m.stars[j].complete for j in before):
                    continue  # every star import is known, and none supplies it
                else:
                    mods, verb = ", ".join(_q(self.st[j].facts.star_import) for j in before), "may supply"
                self._include(s.index, f"calls {_q(callee)}, which star import {mods} {verb}: it changes "
                                       "that module's state", self.point)
                added = True
                break
        return added


def _runs_when_called(node) -> bool:
    """Whether every line of the function `node` runs, if at all, while a call of it runs: a
    plain `def` (not async) with no `yield` and no function, lambda, class or generator
    expression inside it, whose body could run later, from the target."""
    if not isinstance(node, ast.FunctionDef):
        return False
    for n in ast.walk(node):
        if n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
                                            ast.Yield, ast.YieldFrom, ast.GeneratorExp)):
            return False
    return True

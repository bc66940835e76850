"""Which seeds a slice keeps: the last one before each draw it may make, not every seed before it.

Why a part of its own: a lesson seeds before each of its experiments (`torch.manual_seed(42)` in
cell after cell), and a slice that kept every seed of `torch` before its target kept the seeds of
the experiments it left out, and what those seeds read (issue 25). A seed redefines a generator's
state, so what a statement draws depends on the last seed before it and the draws between, which a
slice leaves out unless faithful. Two rules, both here:

- reading a module (`torch.randn(3)` reads `torch`) keeps the seeds of it walking back up to the
  first that sets all of its generators (`bare_seed`: `torch.manual_seed(0)`, not
  `torch.cuda.manual_seed(0)`); `slicer._resolve` skips the seed statements before that one;
- a statement can draw without naming the module: `nn.Linear(3, 8)` initialises its weights from
  torch's generator, `train_test_split(X)` draws from numpy's, where the statement (or the function
  body that reads them) runs. So reading a name imported from a seeded module's package, or from
  a package that draws from it (effects.GENERATOR_USERS), keeps the seeds that decide that module's
  generators where it is read (`_Seeds._seeds`). That is conservative: a statement that only reads
  `DataLoader` keeps the last `torch.manual_seed(42)` before it whether it shuffles or not.

A seed made by a notebook function (`set_seeds(42)`) may do more than seed (its other changes to
the module still matter), so only a statement that is nothing but a seed call ends the walk. This
class is a part of `slicer._Slicer`; its methods use that class's state and helpers.
"""
from __future__ import annotations

import ast
from bisect import bisect_left

from mpify.analysis.effects import GENERATOR_USERS, SEED_ALL_CALLS, SEED_CALLS, seeds_whole
from mpify.analysis.result import _q
from mpify.analysis.scopes import dotted

__all__ = ["bare_seed"]


def bare_seed(node, name) -> str | None:
    """For a statement that is nothing but a seed call on `name` (`torch.manual_seed(seed)`,
    `set_seed(0)`): "whole" when it sets every generator of `name`, "part" when only some
    (`torch.cuda.manual_seed(0)`); None for any other statement (a function that seeds may do more:
    its other changes still matter)."""
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return None
    chain = dotted(node.value.func)
    if not chain or chain[0] != name or chain[-1] not in SEED_CALLS:
        return None
    return "whole" if seeds_whole(chain) else "part"


class _Seeds:
    """The seed rules of `slicer._Slicer`."""

    def _generator_families(self) -> dict:
        """name -> the seeded modules (`torch`, `np`, `random`) whose generators what the name
        holds may draw from: the names imported from the same package (`nn`, `F`, `DataLoader`
        for `torch`) or from a package that draws from it (effects.GENERATOR_USERS)."""
        roots: dict = {}  # name -> root packages of the imports that bind it
        for s in self.st:
            node = s.node
            if isinstance(node, ast.Import):
                for a in node.names:
                    roots.setdefault(a.asname or a.name.split(".")[0], set()).add(a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if a.name != "*":
                        roots.setdefault(a.asname or a.name, set()).add(node.module.split(".")[0])
        seeded: dict = {}  # seeded module -> the packages whose generators its seeds set
        for s in self.st:
            for g, kind in s.facts.mutates.items():
                if kind == "seed" and self.m.kinds.get(g) == "module":
                    pkgs = seeded.setdefault(g, set(roots.get(g, ())))
                    if any(isinstance(n, ast.Call) and (dotted(n.func) or [""])[-1] in SEED_ALL_CALLS
                           for n in ast.walk(s.node)):
                        pkgs.update(GENERATOR_USERS)  # `pl.seed_everything(42)` seeds torch's too
        out: dict = {}
        for g, seeds_of in seeded.items():
            packages = set()
            for pkg in seeds_of:
                packages |= {pkg} | GENERATOR_USERS.get(pkg, set())
            for name, pkgs in roots.items():
                if pkgs & packages:
                    out.setdefault(name, set()).add(g)
        return {name: sorted(gs) for name, gs in out.items()}

    def _seeds(self, name, p, why):
        """Keep the seeds of module `name` that decide what a statement at p may draw from its
        generators: walking back, every seed up to the first that sets all of them (`bare_seed`).
        What the statement reads of `name` otherwise is resolved as any name is (`_resolve`)."""
        ev = self.m.events.get(name, ())
        for i in range(bisect_left(ev, p) - 1, -1, -1):
            j = ev[i]
            if j in self.excluded or self.st[j].facts.mutates.get(name) != "seed":
                continue
            reason = None
            if (j, name) not in self.reason_keys:
                reason = (f"seeds the random state of module {_q(name)}, which "
                          f"{why or 'the target ' + _q(self.target)} may draw from (a call it makes)")
            self._include(j, reason, p, name)
            if bare_seed(self.st[j].node, name) == "whole":
                return

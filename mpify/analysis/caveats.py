"""The slice's warnings: what it keeps but cannot vouch for, and what it cannot see.

Why a part of its own: a slice is correct only as far as the analyzer can read the notebook, and
what it cannot read is said, not guessed: opaque statements and function bodies that read names
dynamically, `if __name__ == "__main__":`, top-level `await`, cells that do not parse or raised
when they last ran, files written by statements left out and named by statements kept, and a
notebook run out of order (execution counts). This class is a part of `slicer._Slicer`; its
methods use that class's state and helpers.
"""
from __future__ import annotations


class _Caveats:
    """The warnings of `slicer._Slicer`, added once the slice's items are known."""

    def _warn(self, items):
        w = self.warnings
        nb = self.m.notebook
        used = {i.index for i in items}
        for it in items:
            s = self.st[it.index]
            w.extend(n for n in s.notes if n not in w)
            f = s.facts
            if f.opaque:
                w.append(f"{s.where()}: opaque statement ({f.opaque}); names it defines or changes "
                         "are invisible to the analyzer")
            if f.opaque_later:
                w.append(f"{s.where()}: the body of {self._desc(it.index)} {f.opaque_later}; names it "
                         "reads dynamically are not in the slice")
            if f.name_main:
                w.append(f"{s.where()}: `if __name__ == \"__main__\":` is true in a notebook but false "
                         "when the slice is imported as a module")
            if f.has_await:
                w.append(f"{s.where()}: top-level `await` works in IPython only; wrap it in an async "
                         "function for a script")
        for b in self.m.broken:
            if b.position <= self.point:
                w.append(f"cell {b.cell}, line {b.lineno}: syntax error ({b.message}); cell left out")
        cells_used = sorted({i.cell for i in items})
        for c in cells_used:
            if nb.cells[c - 1].raised:
                w.append(f"cell {c}: raised an error when it last ran; the slice assumes it runs "
                         "to completion")
        # Files written by statements left out and named by statements kept (no name links them).
        writers = [s for s in self.st if s.facts.writes_files and s.index not in used]
        for it in items:
            lits = self.st[it.index].facts.string_literals
            if not lits or not writers:
                continue
            for s in writers:
                if s.index >= it.index:
                    break
                for path in sorted(s.facts.writes_files & lits):
                    msg = (f"{s.where()} writes {path!r}, which {it.cell and f'cell {it.cell}'} "
                           f"uses; that statement is not in the slice (files are not tracked)")
                    if msg not in w:
                        w.append(msg)
        self._warn_order()

    def _warn_order(self):
        nb = self.m.notebook
        last = self.upto or len(nb.cells)
        code = [c for c in nb.cells[:last] if c.kind == "code" and c.source.strip()]
        counted = [c for c in code if c.execution_count is not None]
        if not counted:
            return
        for a, b in zip(counted, counted[1:]):
            if b.execution_count < a.execution_count:
                self.warnings.append(
                    f"cell {b.cell if hasattr(b, 'cell') else b.index}: execution count "
                    f"{b.execution_count} is lower than cell {a.index}'s ({a.execution_count}): the "
                    "notebook was run out of order; the slice follows notebook order")
                break
        else:
            if len(counted) == len(code):
                for a, b in zip(counted, counted[1:]):
                    if b.execution_count != a.execution_count + 1:
                        self.warnings.append(
                            f"cell {b.index}: execution count jumps from {a.execution_count} (cell "
                            f"{a.index}) to {b.execution_count}: cells were re-run or deleted; the "
                            "slice runs each cell once, in notebook order")
                        break
        never = [c.index for c in code if c.execution_count is None]
        if never and counted:
            self.warnings.append(f"cells {', '.join(map(str, never))} were never run in the saved "
                                 "notebook" if len(never) > 1 else
                                 f"cell {never[0]} was never run in the saved notebook")

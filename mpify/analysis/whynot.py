"""Why a statement is in a slice, or not: `mpify deps --why CELL[:LINE]` (issue 25).

Why a module of its own: a wrong cut is found by asking about one statement, and the answer for a
statement left out is not a reason the slicer wrote (it writes reasons only for what it keeps). It
is read here after the fact from what the slicer left behind (`Slice.trace`): the point the slice
was taken at, the statements that run the target, and every request the closure made, a name as
read at a position. A statement is kept only if some request reaches it: a name it defines or
changes is read later, with no unconditional binding of that name in between. So for a statement
left out the answer is, in order: it comes after the point; it runs the target (or reads what a
run made); for each name it binds or changes, nothing the target needs reads that name after it,
or a later binding hides it; or it binds and changes nothing the analyzer knows of (a display, a
look at data).
"""
from __future__ import annotations

from mpify.analysis.result import _q

__all__ = ["explain"]


# How a statement changes a name (facts.mutates' kinds, effects.MUTATION_RANK), in words.
_CHANGES = {"called": "calls", "call-arg": "passes to a call that may change it", "draw": "draws from",
            "grad": "writes the gradients of", "alias": "changes, through a name that may share it,",
            "state": "changes the state of", "seed": "seeds", "direct": "changes"}


def _shown(name: str) -> str:
    if name.startswith("<module:"):
        return f"the module file {name[8:-1].replace('.', '/')}.py"
    if name.startswith("<file:"):
        return f"the file {name[6:-1]}"
    if name.startswith("<fs:"):
        return f"files under {name[4:-1].strip(chr(34))}"
    return _q(name)


def explain(sl, cell: int, line: int | None = None) -> list[str]:
    """Report lines for the statements of `cell` (1-based, as mpify counts cells), or only the
    one spanning `line`: each statement's first line, then why it is kept or left out."""
    trace = sl.trace
    statements = [s for s in trace.model.statements if s.cell == cell
                  and (line is None or s.lineno <= line <= s.end_lineno)]
    if not statements:
        at = f"cell {cell}" + (f", line {line}" if line is not None else "")
        return [f"{at}: no code statement there (a markdown cell, a comment, a blank line, or a "
                f"magic that is not Python)"]
    kept = {item.index: item for item in sl.items}
    out: list[str] = []
    for s in statements:
        first = s.source.splitlines()[s.lineno - s.source_lineno].strip() if s.source.strip() else ""
        more = " ..." if s.end_lineno > s.lineno else ""
        out.append(f"{s.where()}: {first}{more}")
        if s.index in kept:
            out += [f"    kept: {r}" for r in kept[s.index].reasons]
        else:
            out += [f"    left out: {r}" for r in _why_left_out(sl, s)]
    return out


def _why_left_out(sl, s) -> list[str]:
    trace = sl.trace
    st = trace.model.statements
    j = s.index
    if j == trace.point and sl.run_at is not None and not sl.upto_cell:
        return [f"it is the notebook's run of {_q(sl.target)} that the slice is taken just before"]
    if j >= trace.point:
        return [f"it comes after the point the slice is taken at: {sl.point()}"]
    if j in trace.downstream:
        read, call = trace.downstream[j]
        return [f"it reads {_q(read)}, which {st[call].where()} makes by running {_q(sl.target)}: "
                f"left out with that run"]
    if j in trace.excluded:
        return [f"it runs {_q(sl.target)} (a call or a launch): the slice never runs its target"]
    f = s.facts
    names = dict.fromkeys([*f.defs, *f.dels, *f.mutates])
    if not names:
        return ["it binds nothing and changes nothing the analyzer knows of (a display, a print, "
                "a look at data): nothing the target needs can depend on it"]
    reads: dict = {}  # name -> the positions, after j, where the closure read it
    for name, p in trace.requests:
        if p > j and name in names:
            reads.setdefault(name, []).append(p)
    out = []
    for name in names:
        what = ("binds" if name in f.defs else "deletes" if name in f.dels
                else "writes" if name.startswith("<fs:") else _CHANGES.get(f.mutates[name], "changes"))
        if name not in reads:
            out.append(f"it {what} {_shown(name)}, which nothing the target needs reads after it")
            continue
        hider = _hidden_by(st, trace, name, j, min(reads[name]))
        if hider is not None:
            out.append(f"it {what} {_shown(name)}, but {hider.where()} binds {_q(name)} again "
                       f"before the target's statements read it")
        elif f.mutates.get(name) == "draw":
            out.append(f"it only draws from {_q(name)}, and a later seed resets it (--faithful keeps "
                       f"draws)")
        else:
            out.append(f"it {what} {_shown(name)}, read later, but the analyzer does not count this "
                       f"as making what is read")
    return out


def _hidden_by(st, trace, name, j, p):
    """The first unconditional binding of `name` after j and before p (not one that runs the
    target), or None."""
    for s in st[j + 1:p]:
        if s.index in trace.excluded:
            continue
        if s.facts.defs.get(name) is True or s.facts.dels.get(name) is True:
            return s
    return None

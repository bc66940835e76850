"""Required parameters nobody gave: point at the notebook's own call of the target, to replay it.

Why: a target like `train(model, epochs)` takes a notebook object, which no command-line option can
spell. The notebook shows how it calls it (`train(model, 2)`, `notebook_launcher(train, (model, 2),
num_processes=2)`), so instead of argparse's "the following arguments are required: --model", the
user is told which cell does it and the `--call` (and `-n`) that does the same
(`mpify.analysis.calls` reads the cells). Nothing here runs notebook code.
"""
from __future__ import annotations

from mpify.analysis.calls import best_call, find_target_calls
from mpify.export.errors import MissingArgumentsError

__all__ = ["missing_required", "given_options", "check_required"]


def given_options(params, argv: list[str]) -> set[str]:
    """Names of the parameters that `argv` (what follows `--`) gives a value for. An option counts
    when a token spells it or a prefix of it, as argparse accepts (`--ep 3` for `--epochs`)."""
    given = set()
    for tok in argv:
        if not tok.startswith("--") or tok == "--":
            continue
        opt = tok.split("=", 1)[0]
        for p in params:
            spellings = {p.option, "--" + p.name, "--no-" + p.name.replace("_", "-")}
            if any(s.startswith(opt) for s in spellings):
                given.add(p.name)
    return given


def missing_required(params, given: set, npositional: int = 0) -> list[str]:
    """Required parameters not given: neither among the first `npositional` nor named in `given`."""
    if not params:
        return []
    return [p.name for i, p in enumerate(params) if p.required and i >= npositional and p.name not in given]


def check_required(sl, params, given: set, npositional: int = 0) -> None:
    """Raise MissingArgumentsError when required parameters of the target are missing and the
    notebook calls or launches it (before the slice's export point); otherwise return, and the
    usual argument check says what is wrong."""
    missing = missing_required(params, given, npositional)
    if not missing:
        return
    defs = [(it.cell, it.lineno) for it in sl.items if sl.target in it.defines]
    site = best_call(find_target_calls(sl.notebook, sl.target, sl.upto_cell), max(defs, default=(0, 0)))
    if site is not None:
        raise MissingArgumentsError(sl.target, missing, site)

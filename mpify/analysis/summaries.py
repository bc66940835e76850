"""What a call of a notebook function changes, followed through the notebook functions it calls.

Why: the visitor summarises each function from its body alone (`FunctionSummary`); a body that
calls another notebook function cannot know, when it is read, which function that name will be
when the call runs (late binding: the latest definition before the call). Before issue 16 such a
call was read as changing every argument, so `is_3(valid_x)`, whose body only compares two
`mnist_distance(..)` results, was read as changing `valid_x`, and the exploration that called it
stayed in the slice. Here the call is followed at each top-level call site, with the functions
defined there:

- a function whose body, and every function it calls, changes nothing (no argument, no global,
  no state call) is pure: its calls change nothing (`print(calc_loss(coeffs, x, y))`);
- one that only draws random numbers (seeding first or not) is a draw: its calls are left out
  unless faithful, and in faithful mode a later seed makes them irrelevant, as for any draw;
- one that only prints or plots changes nothing either (displays are queries, effects.py);
- a call of a name that is not a notebook function there, or a recursive call (a function already
  being followed), stays conservative: it may change every argument it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import NamedTuple

from mpify.analysis.effects import combine_kinds

__all__ = ["FunctionSummary", "BodyCall", "Effects", "effects_of", "params_for"]


class BodyCall(NamedTuple):
    """A call of a notebook function in a function body (`calc_preds(coeffs, indeps)`), followed
    when the function is called (summaries.py). Each argument is (the parameters and globals it
    may share, those it may be derived from), as ('param', name) / ('global', name) pairs."""

    callee: str
    pos: list
    kws: dict


@dataclass
class FunctionSummary:
    """What calling a notebook function does, from its body alone (its calls of other notebook
    functions are followed by summaries.py, at the call).

    params: positional parameter names in order; vararg: the `*args` name; mutated_params: those
    it may change -> how ('direct', 'draw', ...); global_writes: module names it assigns through
    `global`; global_mutates: module names it changes -> how; grad_params: parameters whose
    gradients it uses (`p.grad`, `p.parameters()`, `p(x)`); grad_writes / global_grad_writes:
    parameters / globals a backward in it runs through (`loss.backward()` with `loss` computed
    from them); calls: its `BodyCall`s.
    """

    params: list[str] = field(default_factory=list)
    kwonly: list[str] = field(default_factory=list)
    vararg: str | None = None
    mutated_params: dict = field(default_factory=dict)
    global_writes: set[str] = field(default_factory=set)
    global_mutates: dict = field(default_factory=dict)
    grad_params: set = field(default_factory=set)
    grad_writes: set = field(default_factory=set)
    global_grad_writes: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    # What its result may be (aliases.py): globals its `return` values may share or hold, notebook
    # functions whose results it returns, or anything it reads (`returns_any`: it returns a local,
    # or yields).
    returns: set = field(default_factory=set)
    return_calls: set = field(default_factory=set)
    returns_any: bool = False
    is_class: bool = False
    is_iterator: bool = False  # a class that defines `__next__`: its instances are iterators


@dataclass
class Effects:
    """What one call of a function may change: parameters and globals -> how ('direct', 'draw',
    'seed', 'state', 'called', 'call-arg'), globals it assigns, parameters whose gradients it
    uses, parameters and globals a backward in it runs through."""

    params: dict = field(default_factory=dict)
    globals: dict = field(default_factory=dict)
    writes: set = field(default_factory=set)
    grad_params: set = field(default_factory=set)
    grad_writes: set = field(default_factory=set)
    global_grad_writes: set = field(default_factory=set)
    grad_globals: set = field(default_factory=set)


def effects_of(summ: FunctionSummary, latest: dict, memo: dict, stack=()) -> Effects:
    """The effects of calling the function `summ` summarises, its body's calls resolved in
    `latest` (name -> the summary of its latest definition, None for a value). memo: id of a
    summary -> (its effects, the definitions they were followed through), reused while `latest`
    still holds those definitions (a notebook redefines its helpers between calls)."""
    key = id(summ)
    hit = memo.get(key)
    if hit is not None and all(latest.get(n) is s for n, s in hit[1]):
        return hit[0]
    deps: dict = {}
    eff = Effects(dict(summ.mutated_params), dict(summ.global_mutates), set(summ.global_writes),
                  set(summ.grad_params), set(summ.grad_writes), set(summ.global_grad_writes))
    for callee, pos, kws in summ.calls:
        sub = latest.get(callee)
        deps[callee] = sub
        if sub is not None and sub.is_class:
            continue  # constructing a notebook class: arguments stored, not changed (as at top level)
        args = list(zip(params_for(sub, len(pos)), pos)) + [(k, a) for k, a in kws.items()]
        if sub is None or callee not in latest or id(sub) in stack:
            # Not a notebook function when the call runs, or a recursive call: any argument may
            # change, and a backward may run through any of them.
            for _, (share, graph) in args:
                _apply(eff, share, "call-arg")
                _grad(eff, graph)
            continue
        inner = effects_of(sub, latest, memo, stack + (key,))
        deps.update(memo[id(sub)][1])
        for p, (share, graph) in args:
            if p is None:
                continue
            if p in inner.params:
                _apply(eff, share, inner.params[p])
            if p in inner.grad_params:
                for kind, name in share:
                    (eff.grad_params if kind == "param" else eff.grad_globals).add(name)
            if p in inner.grad_writes:
                _grad(eff, graph)
        for g, kind in inner.globals.items():
            eff.globals[g] = combine_kinds(eff.globals.get(g), kind)
        eff.writes |= inner.writes
        eff.global_grad_writes |= inner.global_grad_writes
        eff.grad_globals |= inner.grad_globals
    memo[key] = (eff, tuple(deps.items()))
    return eff


def params_for(summ: FunctionSummary | None, n: int) -> list:
    """The parameter each of n positional arguments binds (the `*args` name past the named ones;
    None where there is none)."""
    if summ is None:
        return [None] * n
    named = list(summ.params[:n])
    return named + [summ.vararg] * (n - len(named))


def _apply(eff: Effects, targets, kind) -> None:
    for where, name in targets:
        d = eff.params if where == "param" else eff.globals
        d[name] = combine_kinds(d.get(name), kind)


def _grad(eff: Effects, targets) -> None:
    for where, name in targets:
        (eff.grad_writes if where == "param" else eff.global_grad_writes).add(name)

"""May-alias: through which names a change reaches an object (issue 16).

Why a module of its own: the effect model (effects.py) says what a call changes, `x.add_(1)`
changes x; this module says which other names see that change. Without it a slice kept the manual
step of a course notebook (`coeffs.sub_(coeffs.grad * 0.1)`) but not the `loss.backward()` that
wrote `coeffs.grad`, and the exported script died at import.

Two relations, computed from the statements (the tables and their reasons are in effects.py):

- *shares* (a view: `v = x.view(-1)`, `row = x[0]`) and *holds* (any other call's result:
  `opt = SGD(model.parameters())`, `dl = DataLoader(ds)`): a name bound to an expression may be, or
  hold, the objects the expression reads, unless the expression is known to make a fresh value
  (`x.item()`, `len(xs)`) or new memory (`a * b`, `x.sum()`). Any change of a view changes its
  object; only a known change of a holder (effects.RECEIVER_MUTATORS, in-place ops) reaches what it
  holds.
- *derived from*: arithmetic, `COMPUTE_CALLS` and containers make new memory that still carries the
  inputs' autograd graph (and, for containers and shallow copies, their elements).

At the top level of a notebook this is a points-to analysis over statements in order (`propagate`):
every binding makes a new abstract object, and a name points to it plus the objects its sources
point to. A change through a name changes the objects it points to, and is recorded as a change
(`'alias'`) of every other name that points to one of them, so the slicer needs nothing new: the
change is an event of those names. Sharing is not transitive through a result: after
`loss = calc_loss(w, x, y)`, a change through `w` does not reach `x`, although `loss` may point to
both. A notebook function's result may also be a global it returns (`m = get_model()`). A
change of an element (`b[0].append(1)`, not `w.grad.zero_()`: an attribute is the object's own)
reaches what the name was derived from too; a backward (`GRAD_CALLS`) reaches, through both
relations, the names whose gradients the notebook uses (`'grad'`). Inside function bodies the same
relations are read flow-insensitively (`close_function`), for the function's summary.
"""
from __future__ import annotations

import ast
from itertools import count
from typing import NamedTuple

from mpify.analysis.effects import (COMPUTE_CALLS, FRESH_ATTRS, FRESH_BUILTINS, FRESH_CALLS, VIEW_CALLS,
                                    combine_kinds)
from mpify.analysis.stateless import StatelessNames
from mpify.analysis.summaries import BodyCall

__all__ = ["Sources", "expr_sources", "propagate", "close_function", "through_element", "iteration_facts"]

# Kinds of change that do not travel to aliases: calling an object (`model(x)`) and passing it to a
# call that may change it are weak evidence (issue 11's precision), and stay on the name.
_LOCAL_ONLY = frozenset({"called", "call-arg"})


class Sources(NamedTuple):
    """What a value may share, by name: `share` (the same objects: `v = x.view(-1)`), `elems` (one
    of their elements: `row = x[0]`, `for xb in dl`, which may be an element of what x was derived
    from), `derived` (computed from them: their autograd graph), `callees` (the bare names it
    calls: a value called (`model(x)`) may return its state, a notebook function what it reads;
    the visitor sorts them)."""

    share: set
    derived: set
    elems: set
    callees: set
    holds: set = frozenset()


def expr_sources(node, external=None, derived=True) -> Sources:
    """The names whose objects the value of `node` may share, hold or be derived from. Names bound
    inside the expression (comprehension targets, lambda parameters) are left out; the caller
    filters names that are not values (modules, functions). external(name): True for a module or
    an imported or notebook function or class: what a call on it returns (`d2l.try_gpu()`,
    `make_data()`) does not hold it (effects.py: calls on those change nothing unless listed)."""
    out = Sources(set(), set(), set(), set(), set())
    _sources(node, out, external or _never, derived)
    return out


def _never(_name) -> bool:
    return False


def _names(node) -> set:
    """Every name read in node, minus those bound inside it (comprehensions, lambdas)."""
    bound = set()
    read = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (read if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
    return read - bound


def _callee_name(func) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _sources(node, out: Sources, ext, dv) -> None:
    """dv: collect the derived names too (a walk of every operand; not needed for what a result
    may share)."""
    if isinstance(node, ast.Name):
        out.share.add(node.id)
    elif isinstance(node, ast.Call):
        _call_sources(node, out, ext, dv)
    elif isinstance(node, (ast.Constant, ast.JoinedStr, ast.Lambda, ast.Compare)):
        pass  # new values (a comparison gives bools, or a tensor of them: no graph)
    elif isinstance(node, ast.Attribute):
        if node.attr not in FRESH_ATTRS:
            _sources(node.value, out, ext, dv)
    elif isinstance(node, ast.Subscript):
        inner = expr_sources(node.value, ext, dv)  # an element or a view
        out.elems.update(inner.share, inner.elems)
        out.derived.update(inner.derived)
        out.callees.update(inner.callees)
        out.holds.update(inner.holds)
        if dv:
            out.derived.update(_names(node.slice))
    elif isinstance(node, (ast.Starred, ast.NamedExpr, ast.Await)):
        _sources(node.value, out, ext, dv)
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
        # A container's elements: a change of an element of it (`pair[0].append(1)`) reaches
        # them, a change of the container (`results.append(x)`) does not.
        elts = node.elts if not isinstance(node, ast.Dict) else (
            [k for k in node.keys if k is not None] + node.values)
        for e in elts:
            inner = expr_sources(e, ext, dv)
            out.derived.update(inner.share, inner.elems, inner.derived, inner.holds)
            out.callees.update(inner.callees)
    elif isinstance(node, ast.BoolOp):
        for e in node.values:
            _sources(e, out, ext, dv)  # `a or b` is one of them
    elif isinstance(node, ast.IfExp):
        _sources(node.body, out, ext, dv)
        _sources(node.orelse, out, ext, dv)
    elif isinstance(node, ast.UnaryOp):
        if dv and not isinstance(node.op, ast.Not):
            out.derived.update(_names(node.operand))
    elif isinstance(node, ast.BinOp):
        if dv:
            out.derived.update(_names(node))  # new memory, the operands' graph
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp)):
        if dv:
            out.derived.update(_names(node))  # a new container; its elements may be the iterables'
    else:
        out.share.update(_names(node))  # a generator (it advances what it iterates), and the rest


def _call_sources(node, out: Sources, ext, dv) -> None:
    func = node.func
    name = _callee_name(func)
    if name in FRESH_CALLS or (isinstance(func, ast.Name) and name in FRESH_BUILTINS):
        return
    if (name == "clone" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
            and _callee_name(func.value.func) == "detach"):
        return  # `x.detach().clone()`: new memory, no graph
    inner = Sources(set(), set(), set(), set(), set())
    if isinstance(func, ast.Attribute):
        if not (isinstance(func.value, ast.Name) and ext(func.value.id)):
            _sources(func.value, inner, ext, dv)  # a method may return its receiver or a view of it
    elif isinstance(func, ast.Name):
        out.callees.add(func.id)
    else:
        _sources(func, inner, ext, dv)
    for a in list(node.args) + [k.value for k in node.keywords]:
        if not (isinstance(a, ast.Name) and ext(a.id)):
            # (a module, function or class passed as an argument, `vision_learner(dls, resnet34)`,
            # is not held as a value a change could reach)
            _sources(a, inner, ext, dv)
    out.callees.update(inner.callees)
    if name in COMPUTE_CALLS:
        out.derived.update(inner.share, inner.elems, inner.derived, inner.holds)
    elif name in VIEW_CALLS:
        out.share.update(inner.share)
        out.elems.update(inner.elems)
        out.derived.update(inner.derived)
        out.holds.update(inner.holds)
    else:
        out.holds.update(inner.share, inner.elems, inner.holds)
        out.derived.update(inner.derived)


_NOTHING = Sources(frozenset(), frozenset(), frozenset(), frozenset(), frozenset())

# ---- iterators: `iter(x)` is x itself only when x is an iterator ---------------------------------
#
# `iter(x)` is in VIEW_CALLS: of an iterator (a generator, a file, `zip(..)`) it returns x itself,
# so `next(it)` advances x. Of anything else (a DataLoader, a Dataset, a list, a tensor) it returns
# a new iterator that only reads x: a peek at a batch (`it = iter(valid_dl); xb, yb = next(it)`)
# changes `it`, not the loader the target trains on (issue 25). At top level, a name bound to an
# instance of a class (a capitalised callee: `DataLoader(ds)`, `TensorDataset(x, y)`) or to a
# container literal is taken as not its own iterator, unless the class is a notebook class that
# defines `__next__`; `iter(..)` of such a name holds it instead of sharing it (propagate), and
# `next(it)` changes only what `it` shares (visit_calls: like a method not known to change what
# the object holds).
_CONTAINER_BUILTINS = frozenset({"list", "tuple", "dict", "set", "frozenset", "sorted", "range"})


def iteration_facts(f, names, value) -> None:
    """Record on facts `f` what a top-level `names = value` says about iteration: `iterables`
    (the name holds a value that is not its own iterator) and `iter_of` (`it = iter(x)`)."""
    if len(names) != 1:
        return
    name = names[0]
    if isinstance(value, (ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.SetComp, ast.DictComp)):
        f.iterables[name] = ""
    elif isinstance(value, ast.Call):
        callee = _callee_name(value.func)
        if callee in _CONTAINER_BUILTINS and isinstance(value.func, ast.Name):
            f.iterables[name] = ""
        elif callee and callee[0].isupper():
            f.iterables[name] = callee
        elif (callee == "iter" and isinstance(value.func, ast.Name) and len(value.args) == 1
              and not value.keywords and isinstance(value.args[0], ast.Name)):
            f.iter_of[name] = value.args[0].id


class _Objects:
    """The points-to state of the top-level names as the statements run, in order."""

    def __init__(self):
        self.pts: dict = {}  # name -> abstract objects it may point to
        self.held: dict = {}  # name -> objects it may hold (a call's result: its arguments)
        self.graph: dict = {}  # name -> objects it may be derived from (its autograd graph)
        self.holders: dict = {}  # object -> names that may point to it or hold it
        self.new = count()

    def reach(self, names, via_graph: bool) -> set:
        out = set()
        for n in names:
            out |= self.pts.get(n, set())
            if via_graph:
                out |= self.graph.get(n, set())
        return out

    def holding(self, names) -> set:
        out = set()
        for n in names:
            out |= self.held.get(n, set())
        return out

    def bind(self, name, src: Sources, strong) -> int:
        """Bind `name` to a new object made from `src`; returns that object."""
        new = next(self.new)
        pts = {new} | self.reach(src.share, False) | self.reach(src.elems, True)
        held = self.reach(src.holds, False) | self.holding(src.share | src.elems | src.holds)
        graph = pts | held | self.reach(src.share | src.elems | src.derived | src.holds, True)
        if not strong:
            pts |= self.pts.get(name, set())
            held |= self.held.get(name, set())
            graph |= self.graph.get(name, set())
        self.unbind(name)
        self.pts[name] = pts
        self.held[name] = held
        self.graph[name] = graph
        for o in pts | held:
            self.holders.setdefault(o, set()).add(name)
        return new

    def unbind(self, name) -> None:
        for o in self.pts.pop(name, set()) | self.held.pop(name, set()):
            self.holders.get(o, set()).discard(name)
        self.graph.pop(name, None)

    def names_of(self, objects) -> set:
        out = set()
        for o in objects:
            out |= self.holders.get(o, set())
        return out


def propagate(statements, grad_names: set, faithful: bool, kinds: dict) -> None:
    """Record, on each top-level statement, the changes its own changes make through aliases:
    `facts.mutates[n] = 'alias'` (or `'grad'`, `'seed'`, `'draw'`) and `facts.via[n]` = the name
    the change was made through. `grad_names`: the names whose gradients the notebook uses;
    kinds: the model's name kinds (modules and notebook functions are no value's alias)."""
    objs = _Objects()
    returns: dict = {}  # notebook function -> (globals its result may be, functions it returns)
    values = StatelessNames()  # names bound to a state-less value: no change reaches them
    not_iterators: set = set()  # objects that are not their own iterators (iteration_facts)
    iterator_classes: set = set()  # notebook classes that define `__next__`
    for st in statements:
        f = st.facts
        after_values = f.values_after if f.values_after is not None else values.after(f)
        for name, summ in f.summaries.items():
            (iterator_classes.add if summ.is_iterator else iterator_classes.discard)(name)
            # (A notebook class's instance holds what it was given, not what its methods read.)
            if not summ.is_class:
                returns[name] = ((set(f.uses_later) if summ.returns_any else summ.returns),
                                 summ.return_calls)
        changes = f.mutates or f.grad_writes
        before = _changes(objs, f, grad_names) if changes else {}
        bound = set()
        for names, src in f.bindings:
            if src.callees:
                # A notebook function's result may be a global it returns (`m = get_model()`),
                # followed through the notebook functions whose results it returns.
                src = Sources(src.share, src.derived, src.elems, src.callees,
                              src.holds | _returned_values(src.callees, returns, kinds))
            if values.touches(src, after_values):
                src = Sources(*({n for n in part if values.changeable(n, after_values)} for part in src))
            for n in names:
                of = f.iter_of.get(n)
                if of in src.share and objs.pts.get(of) and objs.pts[of] <= not_iterators:
                    # `it = iter(valid_dl)`: a new iterator over the loader, not the loader
                    src = Sources(src.share - {of}, src.derived, src.elems, src.callees, src.holds | {of})
                # A name bound to a state-less value is a new object nothing else reaches.
                new = objs.bind(n, _NOTHING if after_values.get(n) else src, f.defs.get(n) is True)
                if f.iterables.get(n) not in (None, *iterator_classes) and f.defs.get(n) is True:
                    not_iterators.add(new)
                bound.add(n)
        for n, strong in f.defs.items():
            if n not in bound and kinds.get(n) not in ("module", "notebook"):
                objs.bind(n, _NOTHING, strong)  # a def, class, import: a new object
        for n, strong in f.dels.items():
            if strong:
                objs.unbind(n)
        if after_values:
            values.advance(f, after_values)
        # The statement's own bindings count too (`for xb in dl: xb.add_(1)` changes dl).
        if not changes:
            continue
        after = _changes(objs, f, grad_names)
        for n, (kind, via) in {**after, **before}.items():
            if n in f.mutates and f.mutates[n] not in _LOCAL_ONLY:
                continue
            if kind == "draw" and not faithful:
                continue
            f.mutates[n] = kind
            f.via[n] = via


def _returned_values(callees, returns, kinds) -> set:
    """The notebook values the results of the notebook functions `callees` may be, through the
    notebook functions whose results they return."""
    out: set = set()
    seen: set = set()
    stack = list(callees)
    while stack:
        g = stack.pop()
        if g in seen or g not in returns:
            continue
        seen.add(g)
        values, calls = returns[g]
        for n in values:
            if kinds.get(n) == "notebook":
                stack.append(n)
            elif kinds.get(n) is None:
                out.add(n)
        stack.extend(calls)
    return out


def _changes(objs, f, grad_names) -> dict:
    """name -> (kind, via) for the names the statement changes through another name. (None that
    holds a state-less value: its object is one nothing else was linked to, `propagate`.)"""
    out: dict = {}
    for m, kind in f.mutates.items():
        if kind in _LOCAL_ONLY or m in f.via:
            continue
        written = objs.reach([m], m in f.deep)
        if m not in f.own:
            written |= objs.holding([m])  # `opt.step()` changes the parameters opt holds
        for n in objs.names_of(written) - {m}:
            out.setdefault(n, ("seed" if kind == "seed" else "draw" if kind == "draw" else "alias", m))
    if f.grad_writes:
        held = objs.reach(grad_names, False)
        for m in f.grad_writes:
            written = objs.reach([m], True) & held
            for n in objs.names_of(written):
                if n != m or n in grad_names:
                    out.setdefault(n, ("grad", m))
    return out

# ---- inside function bodies: the same relations, flow-insensitive, for the function's summary ----

def close_function(scope, outer, grad_names: set) -> None:
    """A function body has been read (`scope`, its summary `scope.summary`; `outer`: the summary
    of the outermost function, which global effects go to). Its changes, backwards and gradient
    uses made through locals reach the parameters and globals those may share (`Scope.sources`,
    read flow-insensitively: an alias may be bound after the change, in a loop); those of an
    enclosing function's names go to that function's scope. Globals whose gradients are used go
    to grad_names; the notebook functions it calls, with what each argument may reach, to
    `outer.calls`."""
    summ = scope.summary
    for name, kind, deep, own in scope.pending:
        for t in _reach(scope, name, deep, own):
            if t[0] == "param":
                summ.mutated_params[t[1]] = combine_kinds(summ.mutated_params.get(t[1]), kind)
            elif t[0] == "global":
                outer.global_mutates[t[1]] = combine_kinds(outer.global_mutates.get(t[1]), kind)
            else:
                t[1].pending.append((t[2], kind, deep, own))
    for names, graph, params, globals_, attr in (
            (scope.grad_writes, True, summ.grad_writes, outer.global_grad_writes, "grad_writes"),
            (scope.observed, False, summ.grad_params, grad_names, "observed")):
        for name in names:
            for t in _reach(scope, name, graph):
                if t[0] == "outer":
                    getattr(t[1], attr).add(t[2])
                else:
                    (params if t[0] == "param" else globals_).add(t[1])
    nested = outer is not summ
    for callee, pos, kws in scope.calls:
        outer.calls.append(BodyCall(callee, [_call_targets(scope, refs, nested) for refs in pos],
                                    {k: _call_targets(scope, refs, nested) for k, refs in kws.items()}))


def _call_targets(scope, refs, nested) -> tuple:
    """An argument's (shared, derived) refs -> (the parameters and globals it may share, those it
    may be derived from). In a nested function, what it passes of its own or of an enclosing
    function is read as changed (its summary is not the one calls are followed for)."""
    shared, derived = refs
    share_t = set()
    for (s, n), elem in shared:
        share_t.update(_reach_ref(scope, s, n, bool(elem)))
    graph_t = set(share_t)
    for s, n in derived:
        graph_t.update(_reach_ref(scope, s, n, True))
    out = []
    for ts in (share_t, graph_t):
        keep = set()
        for t in ts:
            if t[0] == "global" or (t[0] == "param" and not nested):
                keep.add(t)
            elif t[0] == "param":
                scope.summary.mutated_params[t[1]] = "call-arg"
            else:
                t[1].pending.append((t[2], "call-arg", False, False))
        out.append(frozenset(keep))
    return tuple(out)


def through_element(node) -> bool:
    """`b[0].append(1)`, `b[0][1] = 2`: the change is made to an element of b, which a shallow copy
    or a container b was derived from holds too. An attribute chain (`w.grad.zero_()`,
    `model.weight.data`) is the object's own state: not an element."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Subscript):
            return True
        node = node.value
    return False


def _reach(scope, name, graph, own=False) -> set:
    """What a change through `name`, a local of function `scope`, may reach, by the scope's
    sources (and what they were derived from when `graph`: a backward, or a change of an element;
    not what it holds when `own`: a method not known to change it): ('param', p), ('global', g)
    and ('outer', enclosing Scope, name) targets. A source is (ref, False) when shared, (ref,
    True) when an element of it, (ref, None) when held."""
    out: set = set()
    seen: set = set()
    stack = [(name, graph)]
    while stack:
        n, g = stack.pop()
        if (n, g) in seen:
            continue
        seen.add((n, g))
        if n in scope.params:
            out.add(("param", n))
        for (s, m), elem in scope.sources.get(n, ()):
            if elem is None and own and not g:
                continue
            if s is scope:
                stack.append((m, g or bool(elem)))
            else:
                out.add(("global", m) if s is None else ("outer", s, m))
        if g:
            for s, m in scope.derived.get(n, ()):
                if s is scope:
                    stack.append((m, g))
                else:
                    out.add(("global", m) if s is None else ("outer", s, m))
    return out


def _reach_ref(scope, s, n, graph) -> set:
    if s is None:
        return {("global", n)}
    if s is not scope:
        return {("outer", s, n)}
    return _reach(scope, n, graph)

"""One scope-stack visitor that turns a top-level statement into the facts the slicer needs.

Why one visitor: every question the slicer asks (what does this statement define, read now, read
later, mutate) depends on the same thing, which scope a name belongs to. Modelled on marimo's
`_ast/visitor.py`: a stack of scopes (function, class, comprehension) over the statement, the
module scope being the statement itself. Python's rules, each handled where it applies:

- A function's locals are every name bound anywhere in its body (minus `global`/`nonlocal`), found
  before visiting the body, because Python decides that at compile time (scopes.py).
- Class bodies are not visible from the functions and comprehensions nested in them (a method's
  `attr` is the global `attr`); names bound in a class body are class attributes, not module names.
- Comprehension targets do not leak; the first iterable is evaluated in the enclosing scope; a walrus
  inside a comprehension binds in the nearest enclosing non-comprehension scope.
- `except E as e` unbinds `e` when the handler ends (so `e` is not defined after the `try`).
- Decorators, default values, annotations (unless `from __future__ import annotations`), class bases,
  keywords and class bodies are read when the statement runs ("now"); function and lambda bodies are
  read when called ("later", late binding).
- Bindings inside `if`/`for`/`while`/`try`/`match` (and comprehension walruses) are conditional: they
  may not happen, so they do not hide earlier definitions ("weak"). `with` bodies always run.

Mutation follows the effect model of effects.py: `x[k] = v`, `x.a = v`, `del x[k]`, `x += v`
mutate `x`; a call changes state only if it is known to. What a name is comes from `kinds` (built
by the model for the whole notebook): 'module' (bound by `import`), 'object' (bound by `from m
import name`, or supplied by a resolved star import), 'notebook' (a notebook `def`/`class`).
Calls on those change nothing unless effects.py lists them; a method call on any other name (a
notebook value, or a name nothing identifies) may mutate it unless it is a query or a draw. A call
`f(x)` of a notebook function is resolved later against `f`'s summary. In faithful mode every random
draw counts as a change of its generator (`'draw'`), for bit-exact reproduction; a seed call
(`'seed'`) makes the draws before it irrelevant.
"""
from __future__ import annotations

import ast
import builtins
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from mpify.analysis.aliases import Sources, close_function, expr_sources, through_element
from mpify.analysis.effects import (GRAD_CALLS, GRAD_OBSERVERS, LAUNCHERS, MUTATION_RANK, OPAQUE_CALLS,
                                    PURE_BUILTINS, RECEIVER_MUTATORS, SEED_CALLS, WRITE_CALLS,
                                    changes_first_arg, combine_kinds,
                                    external_method_changes_receiver, is_draw, is_inplace, is_query)
from mpify.analysis.scopes import Scope, dotted, root_name, scope_names
from mpify.analysis.summaries import FunctionSummary

__all__ = ["StatementFacts", "BareCall", "analyse_statement"]

# The tables of known effects (which calls change what) live in effects.py; the visitor applies them.
class BareCall(NamedTuple):
    """A call of a bare global name made when a statement runs (`f(x, k=y)`), resolved later
    against the latest definition of `f` (model._resolve_calls)."""

    callee: str
    pos: list  # root name of each positional argument (None for a literal or a call result)
    kws: dict  # keyword -> root name of its argument
    line: int


@dataclass
class StatementFacts:
    """Facts about one top-level statement; line numbers are cell lines.

    defs: name -> True for an unconditional binding (it hides earlier ones), False for a conditional one.
    dels: name -> True for an unconditional `del name`, False for a conditional one (or `except as`).
    uses_now / uses_later / soft_uses: name -> first line where it is read (soft: annotations that are
    not evaluated, resolved if possible but never an error).
    mutates: name -> 'direct' | 'call-arg' | 'called' | 'state' | 'seed' | 'draw' | 'grad' |
    'alias' (how it may change the object; a seed redefines a generator's state, a draw only
    moves it; 'grad' and 'alias' are added by aliases.propagate, with `via`: the name the change
    was made through). deep: names changed through an element or attribute (`b[0].append(1)`).
    bindings: ([names], Sources) for each top-level binding (aliases.py reads what it may share).
    grad_writes: names a backward runs through; grad_names: names whose gradients are used.
    calls: `BareCall`s, the calls of bare global names made now.
    launches: names passed to a launcher call (`ranch(4, train)`).
    """

    defs: dict = field(default_factory=dict)
    dels: dict = field(default_factory=dict)
    uses_now: dict = field(default_factory=dict)
    uses_later: dict = field(default_factory=dict)
    soft_uses: dict = field(default_factory=dict)
    mutates: dict = field(default_factory=dict)
    via: dict = field(default_factory=dict)
    deep: set = field(default_factory=set)
    own: set = field(default_factory=set)
    bindings: list = field(default_factory=list)
    grad_writes: set = field(default_factory=set)
    grad_names: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    called_now: set = field(default_factory=set)
    launches: set = field(default_factory=set)
    summaries: dict = field(default_factory=dict)
    opaque: str | None = None
    opaque_later: str | None = None
    star_import: str | None = None
    future_annotations: bool = False
    imports: set = field(default_factory=set)
    has_await: bool = False
    name_main: bool = False
    writes_files: set = field(default_factory=set)
    string_literals: set = field(default_factory=set)


class _Visitor(ast.NodeVisitor):
    def __init__(self, kinds, future_annotations, faithful=False):
        self.f = StatementFacts()
        self.kinds = kinds  # global name -> 'module' | 'object' | 'notebook' (see the docstring)
        self.faithful = faithful
        self.future = future_annotations
        self.stack: list[Scope] = []
        self.cond = 0  # depth of conditional constructs (changed only by `_conditional()`)
        self.bound_now: set = set()  # module names bound so far by this statement
        self.soft = False  # visiting annotations that are never evaluated

    # ---- scopes -------------------------------------------------------------------------------
    def _lookup(self, name):
        """The scope that owns `name` as read here, or None for the module (global) scope."""
        n = len(self.stack)
        for i in range(n - 1, -1, -1):
            s = self.stack[i]
            if s.kind == "class" and i != n - 1:
                continue  # class bodies are invisible to nested functions and comprehensions
            if name in s.globals:
                return None
            if name in s.local or name in s.nonlocals:
                return s
        return None

    def _later(self) -> bool:
        for s in self.stack:  # a plain loop: called for every name read
            if s.kind == "function":
                return True
        return False

    def _func_summary(self):
        """The summary of the innermost function being visited (global effects go to the outermost)."""
        for s in reversed(self.stack):
            if s.kind == "function":
                return s.summary
        return None

    def _outer_summary(self):
        for s in self.stack:
            if s.kind == "function":
                return s.summary
        return None

    def _read(self, name, lineno):
        if self._lookup(name) is not None:
            return
        if self._later():
            self.f.uses_later.setdefault(name, lineno)
        elif self.soft:
            if name not in self.bound_now:
                self.f.soft_uses.setdefault(name, lineno)
        elif name not in self.bound_now:
            self.f.uses_now.setdefault(name, lineno)

    def _bind(self, name, lineno, weak=False):
        if self.stack:
            s = self.stack[-1]
            if s.kind == "class":
                s.local.add(name)
                return
            if s.kind == "function" and name in s.globals:
                summ = self._outer_summary()
                if summ is not None:
                    summ.global_writes.add(name)
                return
            return  # function local (precomputed) or comprehension target
        strong = self.cond == 0 and not weak
        self.f.defs[name] = self.f.defs.get(name, False) or strong
        self.bound_now.add(name)

    def _refs(self, name) -> list:
        """Where `name`, as read here, lives: [(None, global name)] or [(function Scope, name)];
        a comprehension target is an element of what its iterable reads: those refs."""
        owner = self._lookup(name)
        if owner is None:
            return [(None, name)]
        if owner.kind == "function":
            return [(owner, name)]
        if owner.kind == "comprehension":
            if owner.calls:
                self._comprehension_sources(owner)
            return [r for r, _elem in owner.sources.get(name, ())]
        return []  # a class attribute

    def _mutate(self, name, kind, lineno, deep=False, own=False):
        """`name` may change (`kind`: see MUTATION_RANK); deep: through an element; own: by a
        method not known to change what the object holds (aliases.py)."""
        if name is None:
            return
        for scope, n in self._refs(name):
            if scope is not None:
                scope.pending.append((n, kind, deep, own))  # resolved when the body is read
            elif self._later():
                summ = self._outer_summary()
                if summ is not None:
                    summ.global_mutates[n] = combine_kinds(summ.global_mutates.get(n), kind)
            else:
                old = self.f.mutates.get(n)
                if own and old is None:
                    self.f.own.add(n)
                elif not own:
                    self.f.own.discard(n)
                if old is None or MUTATION_RANK[kind] > MUTATION_RANK[old]:
                    self.f.mutates[n] = kind
                if deep:
                    self.f.deep.add(n)

    def _grad_writes_of(self, expr):
        shared, derived = self._value_refs(expr_sources(expr, self._external))
        for scope, n in {r for r, _ in shared} | derived:
            if scope is not None:
                scope.grad_writes.add(n)
            elif self._later():
                summ = self._outer_summary()
                if summ is not None:
                    summ.global_grad_writes.add(n)
            else:
                self.f.grad_writes.add(n)

    def _observe(self, name):
        """The gradients of `name` are used (effects.GRAD_OBSERVERS)."""
        for scope, n in self._refs(name) if name is not None else ():
            if scope is not None:
                scope.observed.add(n)
            else:
                self.f.grad_names.add(n)

    def _external(self, name) -> bool:
        """A module, or an imported or notebook function or class (aliases.expr_sources)."""
        return self._kind(name) is not None

    def _value_refs(self, src: Sources, scope=None) -> tuple[set, set]:
        """(shared, derived) refs of a value's sources, as `Scope.sources` holds them: modules,
        notebook functions and classes, and imported functions called, are not values. scope: a
        function scope just popped, whose own names are looked up there, the others here."""
        def refs(n):
            return [(scope, n)] if scope is not None and n in scope.local else self._refs(n)

        def keep(n):
            return ((scope is not None and n in scope.local) or self._lookup(n) is not None
                    or self.kinds.get(n) not in _EXTERNAL)

        def value_callee(n):
            return ((scope is not None and n in scope.local) or self._lookup(n) is not None
                    or (n not in self.kinds and not hasattr(builtins, n)))

        shared = {(r, False) for n in src.share if keep(n) for r in refs(n)}
        shared |= {(r, True) for n in src.elems if keep(n) for r in refs(n)}
        shared |= {(r, None) for n in src.holds if keep(n) for r in refs(n)}
        shared |= {(r, None) for n in src.callees if value_callee(n) for r in refs(n)}
        derived = {r for n in src.derived if keep(n) for r in refs(n)}
        return shared, derived

    def _record_binding(self, targets, value, elements=False):
        """`targets = value` (or `for targets in value`, `with value as targets`): what the bound
        names may share (aliases.py). elements: the targets are elements of the value."""
        names = [t.id if isinstance(t, ast.Name) else n.id for t in targets
                 for n in ((t,) if isinstance(t, ast.Name) else ast.walk(t))
                 if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        if not names:
            return
        src = expr_sources(value, self._external) if value is not None else Sources(set(), set(), set(), set())
        if elements:
            # `for x in xs`: x is an element of xs, or of what xs was made from (`[a, b]`).
            src = Sources(set(), set(), src.share | src.elems | src.holds | src.derived, src.callees)
        if isinstance(value, ast.Call) and (
                any(k.arg == "requires_grad" for k in value.keywords)
                or (isinstance(value.func, (ast.Name, ast.Attribute))
                    and getattr(value.func, "id", getattr(value.func, "attr", None)) == "Parameter")):
            for n in names:
                self._observe(n)  # `w = torch.zeros(3, requires_grad=True)`, `nn.Parameter(..)`
        if not self.stack:
            # Top level: every name read is global (comprehension targets are left out by
            # expr_sources); values only.
            kinds = self.kinds
            self.f.bindings.append((names, Sources(
                {n for n in src.share if kinds.get(n) not in _EXTERNAL},
                {n for n in src.derived if kinds.get(n) not in _EXTERNAL},
                {n for n in src.elems if kinds.get(n) not in _EXTERNAL},
                {n for n in src.callees if kinds.get(n) == "notebook"},
                {n for n in src.holds if kinds.get(n) not in _EXTERNAL}
                | {n for n in src.callees if n not in kinds and not hasattr(builtins, n)})))
            return
        scope = self.stack[-1]
        if scope.kind == "function":
            # Read when the body is closed, and only if something is changed through a local.
            scope.bindings.append(([n for n in names if n in scope.local], src))

    def _kind(self, name) -> str | None:
        """'module', 'object' or 'notebook' for a global name known to be one, else None (a
        notebook value, a local, or a name nothing identifies)."""
        if name is None or self._lookup(name) is not None:
            return None
        return self.kinds.get(name)

    def _is_module(self, name) -> bool:
        return self._kind(name) == "module"

    def _opaque(self, why):
        if self._later():
            self.f.opaque_later = self.f.opaque_later or why
        else:
            self.f.opaque = self.f.opaque or why

    # ---- generic --------------------------------------------------------------------------------
    def visit(self, node):
        # ast.NodeVisitor.visit looks the method up by name on every node; one dict lookup per
        # node type instead (the 1,000-cell benchmark visits about 27,000 nodes).
        method = _DISPATCH.get(type(node))
        if method is None:
            method = _DISPATCH[type(node)] = getattr(type(self), "visit_" + type(node).__name__,
                                                     type(self).generic_visit)
        return method(self, node)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self._read(node.id, node.lineno)
        elif isinstance(node.ctx, ast.Store):
            self._bind(node.id, node.lineno)
        # Del is handled by visit_Delete

    def visit_Constant(self, node):
        if isinstance(node.value, str) and len(node.value) < 200:
            self.f.string_literals.add(node.value)

    def _store_target(self, node):
        """Visit an assignment target: names bind, `x.a`/`x[k]` mutate `x`."""
        if isinstance(node, ast.Name):
            self._bind(node.id, node.lineno)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for e in node.elts:
                self._store_target(e)
        elif isinstance(node, ast.Starred):
            self._store_target(node.value)
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            self.visit(node.value)
            if isinstance(node, ast.Subscript):
                self.visit(node.slice)
            self._mutate(root_name(node), "direct" if not self._is_module(root_name(node)) else "state",
                         node.lineno, deep=through_element(node.value))
        else:
            self.visit(node)

    def visit_Attribute(self, node):
        if not isinstance(node.ctx, ast.Load):
            if node.attr == "requires_grad":
                self._observe(root_name(node))
            self._store_target(node)
            return
        if node.attr == "grad":
            self._observe(root_name(node))  # `coeffs.grad`: its gradients are used
        self.visit(node.value)

    def visit_Subscript(self, node):
        if not isinstance(node.ctx, ast.Load):
            self._store_target(node)
            return
        self.visit(node.value)
        self.visit(node.slice)

    # ---- statements -----------------------------------------------------------------------------
    def visit_Assign(self, node):
        self.visit(node.value)
        for t in node.targets:
            self._store_target(t)
        first = node.targets[0]
        if (isinstance(first, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List))
                and len(first.elts) == len(node.value.elts)
                and not any(isinstance(e, ast.Starred) for e in first.elts + node.value.elts)):
            for t, val in zip(first.elts, node.value.elts):
                self._record_binding([t], val)  # `a, b = b, a`: each name its own value
        else:
            self._record_binding(node.targets[:1], node.value)
        for t in node.targets[1:]:
            # `a = b = []` binds one object to both names: b shares a (aliases.py).
            self._record_binding([t], ast.Name(first.id, ast.Load()) if isinstance(first, ast.Name)
                                 else node.value)
        if not self.stack:
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if isinstance(node.value, ast.Lambda) and len(names) == 1 and self._last_lambda:
                self.f.summaries[names[0]] = self._last_lambda

    _last_lambda = None

    def visit_AugAssign(self, node):
        self.visit(node.value)
        t = node.target
        if isinstance(t, ast.Name):
            self._read(t.id, t.lineno)
            self._bind(t.id, t.lineno, weak=True)  # needs the old value: does not hide it
            self._mutate(t.id, "direct", t.lineno)  # `lst += [3]` changes the object in place
        else:
            self._store_target(t)  # `x.a += 1` / `x[k] += 1`: reads and mutates x

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
        in_function = any(s.kind == "function" for s in self.stack) and not (
            self.stack and self.stack[-1].kind == "class")
        if node.simple and in_function:
            pass  # annotations of function locals are never evaluated
        else:
            old = self.soft
            self.soft = self.soft or self.future
            self.visit(node.annotation)
            self.soft = old
        if node.value is not None or not isinstance(node.target, ast.Name):
            self._store_target(node.target)
        if node.value is not None:
            self._record_binding([node.target], node.value)

    def visit_Delete(self, node):
        for t in node.targets:
            if isinstance(t, ast.Name):
                self._read(t.id, t.lineno)
                if not self.stack:
                    self.f.dels[t.id] = self.f.dels.get(t.id, False) or self.cond == 0
                    self.bound_now.discard(t.id)
            elif isinstance(t, (ast.Tuple, ast.List)):
                self.visit_Delete(ast.Delete(targets=t.elts))
            else:
                self._store_target(t)

    @contextmanager
    def _conditional(self):
        """Bindings made inside may not happen (if/for/while/try/match bodies, comprehensions)."""
        self.cond += 1
        try:
            yield
        finally:
            self.cond -= 1

    def _visit_all(self, nodes):
        for n in nodes:
            self.visit(n)

    def visit_If(self, node):
        if not self.stack and _is_name_main(node.test):
            self.f.name_main = True
        self.visit(node.test)
        with self._conditional():
            self._visit_all(node.body + node.orelse)

    def visit_For(self, node):
        self.visit(node.iter)
        with self._conditional():
            self._store_target(node.target)
            self._record_binding([node.target], node.iter, elements=True)
            self._visit_all(node.body + node.orelse)

    visit_AsyncFor = visit_For

    def visit_While(self, node):
        self.visit(node.test)
        with self._conditional():
            self._visit_all(node.body + node.orelse)

    def visit_With(self, node):
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self._store_target(item.optional_vars)
                self._record_binding([item.optional_vars], item.context_expr)
        for n in node.body:
            self.visit(n)

    visit_AsyncWith = visit_With

    def visit_Try(self, node):
        with self._conditional():
            self._visit_try(node)

    def _visit_try(self, node):
        self._visit_all(node.body)
        for h in node.handlers:
            if h.type is not None:
                self.visit(h.type)
            if h.name and not self.stack:
                # `except E as e` binds e for the handler only, then deletes it.
                had = h.name in self.bound_now
                self.bound_now.add(h.name)
                for n in h.body:
                    self.visit(n)
                if not had:
                    self.bound_now.discard(h.name)
                self.f.dels.setdefault(h.name, False)
            else:
                for n in h.body:
                    self.visit(n)
        self._visit_all(node.orelse + node.finalbody)

    visit_TryStar = visit_Try

    def visit_Match(self, node):
        self.visit(node.subject)
        with self._conditional():
            for case in node.cases:
                self.visit(case.pattern)
                if case.guard is not None:
                    self.visit(case.guard)
                self._visit_all(case.body)

    def visit_MatchAs(self, node):
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._bind(node.name, node.lineno)

    def visit_MatchStar(self, node):
        if node.name:
            self._bind(node.name, node.lineno)

    def visit_MatchMapping(self, node):
        for k in node.keys:
            self.visit(k)
        for p in node.patterns:
            self.visit(p)
        if node.rest:
            self._bind(node.rest, node.lineno)

    def visit_Import(self, node):
        for a in node.names:
            root = a.name.split(".")[0]
            if not self.stack:
                self.f.imports.add(root)
            if a.asname:
                self._bind(a.asname, node.lineno)
            else:
                # `import a.b` binds `a` but other `import a.c` statements stay needed: weak.
                self._bind(root, node.lineno, weak="." in a.name)

    def visit_ImportFrom(self, node):
        if not self.stack and node.module and not node.level:
            self.f.imports.add(node.module.split(".")[0])
        if node.module == "__future__" and not self.stack:
            if any(a.name == "annotations" for a in node.names):
                self.f.future_annotations = True
        for a in node.names:
            if a.name == "*":
                if not self.stack:
                    self.f.star_import = ("." * (node.level or 0)) + (node.module or "")
                continue
            self._bind(a.asname or a.name, node.lineno)

    def visit_Global(self, node):
        pass  # handled when the function scope is built

    visit_Nonlocal = visit_Global

    def _returned(self, value):
        """A value the innermost function returns: what its result may share (aliases.py)."""
        scope = next((s for s in reversed(self.stack) if s.kind == "function"), None)
        if scope is None or value is None:
            return
        summ = scope.summary
        src = expr_sources(value, self._external, derived=False)
        for n in src.share | src.elems | src.holds | src.callees:
            owner = self._lookup(n)
            if owner is None and self.kinds.get(n) == "notebook":
                summ.return_calls.add(n)
            elif owner is None and self.kinds.get(n) is None and not hasattr(builtins, n):
                summ.returns.add(n)
            elif owner is not None and n not in owner.params:
                summ.returns_any = True  # a local: whatever it was bound to

    def visit_Return(self, node):
        self._returned(node.value)
        self.generic_visit(node)

    def visit_Yield(self, node):
        scope = next((s for s in reversed(self.stack) if s.kind == "function"), None)
        if scope is not None:
            scope.summary.returns_any = True  # a generator: its elements are what it yields
        self.generic_visit(node)

    visit_YieldFrom = visit_Yield

    def visit_Await(self, node):
        if not self._later():
            self.f.has_await = True
        self.generic_visit(node)

    # ---- definitions ----------------------------------------------------------------------------
    def _visit_args_now(self, args: ast.arguments, returns=None):
        for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)
        anns = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs if a.annotation]
        for a in (args.vararg, args.kwarg):
            if a is not None and a.annotation is not None:
                anns.append(a.annotation)
        if returns is not None:
            anns.append(returns)
        old = self.soft
        self.soft = self.soft or self.future
        for a in anns:
            self.visit(a)
        self.soft = old

    def _push_function(self, args: ast.arguments, body):
        params = [a.arg for a in args.posonlyargs + args.args]
        kwonly = [a.arg for a in args.kwonlyargs]
        allp = params + kwonly + [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        bound, g, nl = scope_names(body if isinstance(body, list) else [body])
        if not isinstance(body, list):
            g, nl = set(), set()  # a lambda's body is an expression: no declarations
        local = (set(allp) | bound) - g - nl
        summ = FunctionSummary(params=params, kwonly=kwonly,
                               vararg=args.vararg.arg if args.vararg is not None else None)
        self.stack.append(Scope("function", set(local), set(g), set(nl), summ, set(allp)))
        return summ

    def visit_FunctionDef(self, node):
        for d in node.decorator_list:
            self.visit(d)
        self._visit_args_now(node.args, node.returns)
        top = not self.stack
        summ = self._push_function(node.args, node.body)
        for n in node.body:
            self.visit(n)
        self._pop_function()
        self._merge_nested(summ)
        self._bind(node.name, node.lineno)
        if top:
            self.f.summaries[node.name] = summ

    visit_AsyncFunctionDef = visit_FunctionDef

    def _pop_function(self):
        """The body has been read: what it changes through its locals (aliases.close_function)."""
        scope = self.stack.pop()
        if scope.pending or scope.grad_writes or scope.observed or scope.calls:
            for names, src in scope.bindings:
                shared, derived = self._value_refs(src, scope)
                for n in names:
                    scope.sources.setdefault(n, set()).update(shared)
                    scope.derived.setdefault(n, set()).update(derived)
        close_function(scope, self._outer_summary() or scope.summary, self.f.grad_names)

    def _merge_nested(self, summ):
        """A nested function's effects on module names count for the function that contains it."""
        outer = self._outer_summary()
        if outer is not None and outer is not summ:
            outer.global_writes |= summ.global_writes
            for g, k in summ.global_mutates.items():
                outer.global_mutates[g] = combine_kinds(outer.global_mutates.get(g), k)
            outer.global_grad_writes |= summ.global_grad_writes

    def visit_Lambda(self, node):
        self._visit_args_now(node.args)
        summ = self._push_function(node.args, node.body)
        self._returned(node.body)
        self.visit(node.body)
        self._pop_function()
        self._merge_nested(summ)
        if not self.stack:
            self._last_lambda = summ

    def visit_ClassDef(self, node):
        for d in node.decorator_list:
            self.visit(d)
        for b in node.bases:
            self.visit(b)
        for k in node.keywords:
            self.visit(k.value)
        top = not self.stack
        self.stack.append(Scope("class"))
        for n in node.body:
            self.visit(n)
        self.stack.pop()
        self._bind(node.name, node.lineno)
        if top:
            self.f.summaries[node.name] = FunctionSummary(is_class=True)

    def _visit_comprehension(self, node, elts):
        gens = node.generators
        self.visit(gens[0].iter)  # evaluated in the enclosing scope
        targets = set()
        for g in gens:
            targets |= {n.id for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        scope = Scope("comprehension", set(targets))
        scope.calls = list(gens)  # its targets' sources, read if one is changed
        self.stack.append(scope)
        with self._conditional():
            for i, g in enumerate(gens):
                if i:
                    self.visit(g.iter)
                self._visit_all(g.ifs)
            self._visit_all(elts)
        self.stack.pop()

    def _comprehension_sources(self, scope):
        """A comprehension's targets are elements of its iterables (`[p.grad.zero_() for p in
        ps]` changes ps's elements). Read when one of them is first changed (rare: not for every
        comprehension, the benchmark), with the names of the first iterable looked up in the
        enclosing scope and the others in the comprehension's."""
        gens, scope.calls = scope.calls, []
        saved = self.stack
        at = saved.index(scope)
        try:
            for i, gen in enumerate(gens):
                self.stack = saved[:at + (1 if i else 0)]
                src = expr_sources(gen.iter, self._external)
                refs = {(r, True) for n in src.share | src.elems | src.derived for r in self._refs(n)}
                for n in ast.walk(gen.target):
                    if isinstance(n, ast.Name):
                        scope.sources.setdefault(n.id, set()).update(refs)
        finally:
            self.stack = saved

    def visit_ListComp(self, node):
        self._visit_comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node):
        self._visit_comprehension(node, [node.key, node.value])

    def visit_NamedExpr(self, node):
        self.visit(node.value)
        name = node.target.id
        # Binds in the nearest enclosing scope that is not a comprehension.
        inner = [s for s in self.stack if s.kind != "comprehension"]
        in_comp = bool(self.stack) and self.stack[-1].kind == "comprehension"
        if inner:
            s = inner[-1]
            if s.kind == "function" and name in s.globals:
                summ = self._outer_summary()
                if summ is not None:
                    summ.global_writes.add(name)
            elif s.kind == "class":
                s.local.add(name)
            return
        saved, self.stack = self.stack, []
        self._bind(name, node.lineno, weak=in_comp)
        self.stack = saved

    # ---- calls ----------------------------------------------------------------------------------
    def visit_Call(self, node):
        func = node.func
        argnodes = list(node.args) + [k.value for k in node.keywords]
        if isinstance(func, ast.Name):
            name = func.id
            user = self._lookup(name) is not None or name in self.bound_now
            if self._kind(name) is None and (self._lookup(name) is not None or not hasattr(builtins, name)):
                self._observe(name)  # an object called (`model(xb)`): a module, its parameters
            if name in OPAQUE_CALLS and not user:
                self._opaque(f"calls {name}()")
            elif name == "setattr" and not user and len(node.args) >= 2:
                if isinstance(node.args[1], ast.Constant):
                    self._mutate(root_name(node.args[0]), "direct", node.lineno)
                else:
                    self._opaque("calls setattr() with a computed name")
            elif name in LAUNCHERS:
                self.f.launches.update(n.id for a in argnodes for n in ast.walk(a)
                                       if isinstance(n, ast.Name))
            elif name in PURE_BUILTINS and not user:
                pass
            elif self._lookup(name) is None and not self._later():
                self.f.called_now.add(name)
                pos = [root_name(a) for a in node.args]
                kws = {k.arg: root_name(k.value) for k in node.keywords if k.arg}
                self.f.calls.append(BareCall(name, pos, kws, node.lineno))
            elif self._kind(name) == "object" or (self._kind(name) == "module"):
                # In a function body, a function the notebook imports (`tensor(x)`, `F.relu` is
                # an attribute): only the listed ones change their argument.
                if changes_first_arg(name) and node.args:
                    self._mutate(root_name(node.args[0]), "direct", node.lineno)
            elif self._kind(name) is None and not (self._lookup(name) is None and hasattr(builtins, name)):
                # An object called in a function body (`model(xb)`, a parameter or a notebook
                # value): like a method call on it, it may change the object (a BatchNorm's
                # running stats), not its arguments (issue 11: `validate(model0)` read as
                # changing the `X` its body passes to `model`).
                self._mutate(name, "called", node.lineno)
            elif self._kind(name) == "notebook":
                # A notebook function, in a function body: what it changes is followed when the
                # function is called (summaries.py), with the function then defined under `name`.
                scope = next(s for s in reversed(self.stack) if s.kind == "function")
                pos = [self._value_refs(expr_sources(a, self._external)) for a in node.args
                       if not isinstance(a, ast.Starred)]
                kws = {k.arg: self._value_refs(expr_sources(k.value, self._external)) for k in node.keywords if k.arg}
                if any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords):
                    for a in argnodes:  # `f(*xs)`: which parameter gets what is unknown
                        self._mutate(root_name(a), "call-arg", node.lineno)
                else:
                    scope.calls.append((name, pos, kws))
            else:
                # A builtin that PURE_BUILTINS does not clear: it may change its arguments
                # (`next(it)` does change its first, see effects.ARG_MUTATORS).
                for i, a in enumerate(argnodes):
                    self._mutate(root_name(a), "direct" if i == 0 and changes_first_arg(name) else "call-arg",
                                 node.lineno)
        elif isinstance(func, ast.Attribute):
            self._method_call(node, func, argnodes)
        if isinstance(func, ast.Name) and func.id == "open" and not self._later():
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                    and any(c in mode.value for c in "wax") and node.args
                    and isinstance(node.args[0], ast.Constant)):
                self.f.writes_files.add(node.args[0].value)
        self.visit(func)
        for a in argnodes:
            self.visit(a)

    def _method_call(self, node, func, argnodes):
        """`recv.meth(..)`: what it changes, by the effect model of effects.py."""
        recv = func.value
        root = root_name(recv)
        meth = func.attr
        chain = dotted(func)
        kind = self._kind(root)
        if meth in GRAD_OBSERVERS and kind is None:
            self._observe(root)
        if meth == "backward" and kind is None:
            # `loss.backward()`, `l.sum().backward()` change no value of `loss`: they write the
            # `.grad` of what it was computed from (aliases.py), so this is not a change of `loss`
            # or of what it shares.
            self._grad_writes_of(recv)
            return
        if meth in GRAD_CALLS and kind == "module" and chain and "autograd" in chain and node.args:
            self._grad_writes_of(node.args[0])  # `torch.autograd.backward(loss)`
        if isinstance(recv, ast.Call) and isinstance(recv.func, ast.Name) and recv.func.id == "get_ipython":
            self._opaque(f"uses get_ipython().{meth}")
        elif kind is not None:
            # A module, an imported object, or a notebook function or class: listed calls only.
            if meth in LAUNCHERS:
                self.f.launches.update(n.id for a in argnodes for n in ast.walk(a)
                                       if isinstance(n, ast.Name))
            elif external_method_changes_receiver(meth, chain, kind == "module" and recv is not None
                                                  and isinstance(recv, ast.Name)):
                self._mutate(root, "seed" if meth in SEED_CALLS else "state", node.lineno)
            elif is_draw(meth) and (self.faithful or self._later()):
                # `np.random.rand()` moves numpy's generator. In a function body always: the
                # function's summary says it draws (summaries.py), its calls decide.
                self._mutate(root, "draw", node.lineno)
            if meth == "import_module":
                self._opaque("imports a module by computed name")
        elif root is not None:
            inplace = any(k.arg == "inplace" and isinstance(k.value, ast.Constant) and k.value.value
                          for k in node.keywords)
            if meth in SEED_CALLS:
                self._mutate(root, "seed", node.lineno)  # `g.manual_seed(0)`: a new state
            elif is_draw(meth) and not inplace:
                # `rng.normal()` only moves the generator: left out unless faithful.
                if self.faithful or self._later():
                    self._mutate(root, "draw", node.lineno)
            elif not (is_query(meth) or meth in WRITE_CALLS) or inplace:
                # (`tok.save_pretrained(d)`, `df.to_csv(p)` write files; the object stays as it was.)
                # A method not known to change anything (`learn.fine_tune(1)`) changes the object,
                # not what it was built over (aliases.py: `dls` is not trained).
                self._mutate(root, "direct", node.lineno, deep=through_element(recv),
                             own=not (inplace or is_inplace(meth) or meth in RECEIVER_MUTATORS))
        elif isinstance(recv, ast.Call) and (is_inplace(meth) or meth in RECEIVER_MUTATORS or any(
                k.arg == "inplace" for k in node.keywords)):
            # `x.view(-1).add_(1)`, `torch.as_tensor(arr).zero_()`: the call's result may share what
            # it was made from (aliases.py), so changing it in place changes that. (Only the known
            # in-place changes: `is_3(x).float()` of a result is a conversion, not a change of x.)
            src = expr_sources(recv, self._external, derived=False)
            for n in src.share | src.elems | src.holds:
                if self._kind(n) not in _EXTERNAL:
                    self._mutate(n, "direct", node.lineno, deep=n in src.elems)
        if node.args and (changes_first_arg(meth) if kind is not None else meth == "shuffle"):
            # `random.shuffle(xs)`, `nn.init.zeros_(w)`, and on a generator object
            # `rng.shuffle(xs)`: the argument changes (`x.add_(y)` on a notebook object changes x).
            self._mutate(root_name(node.args[0]), "direct", node.lineno)
        if meth in WRITE_CALLS and not self._later():
            for a in argnodes + [recv]:
                for n in ast.walk(a):
                    if isinstance(n, ast.Constant) and isinstance(n.value, str):
                        self.f.writes_files.add(n.value)


_DISPATCH: dict = {}  # node type -> _Visitor method (see _Visitor.visit)
# Kinds of global names that are not values a binding may share (an imported object may be one).
_EXTERNAL = frozenset({"module", "notebook"})


def _is_name_main(test) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def analyse_statement(node: ast.stmt, kinds=None, future_annotations=False,
                      faithful=False) -> StatementFacts:
    """Facts about one top-level statement. `kinds`: what the notebook's global names are (name ->
    'module' | 'object' | 'notebook'; see the module docstring); `faithful`: draws are changes."""
    v = _Visitor(kinds if kinds is not None else {}, future_annotations, faithful)
    v.visit(node)
    f = v.f
    # A function body reading a name this same statement defines (recursion, methods naming their
    # class) is not an outside dependency.
    for n in list(f.uses_later):
        if n in f.defs:
            del f.uses_later[n]
    return f

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

The visitor is one class, `_Visitor`, assembled from parts that each handle one kind of node:
this module holds the scope stack and what every part does with a name (read, bind, mutate, the
sources of a value), and the generic nodes (names, attributes, subscripts, assignment targets);
visit_statements.py the statements (assignments, `del`, control flow, imports); visit_scopes.py
the constructs that open a scope (`def`, `lambda`, `class`, comprehensions, and the walrus that
binds past them) and what a function returns; visit_calls.py the calls, by the effect model of
effects.py. The facts it returns, and the `kinds` it reads, are facts.py's.
"""
from __future__ import annotations

import ast
import builtins
from contextlib import contextmanager

from mpify.analysis.aliases import Sources, expr_sources, iteration_facts, through_element
from mpify.analysis.effects import MUTATION_RANK, combine_kinds
from mpify.analysis.facts import _EXTERNAL, StatementFacts
from mpify.analysis.scopes import Scope, root_name
from mpify.analysis.stateless import stateless_deps
from mpify.analysis.visit_calls import _CallVisits
from mpify.analysis.visit_scopes import _ScopeVisits
from mpify.analysis.visit_statements import _StatementVisits

__all__ = ["analyse_statement"]

# The tables of known effects (which calls change what) live in effects.py; the visitor applies them.
class _Visitor(_StatementVisits, _ScopeVisits, _CallVisits, ast.NodeVisitor):
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
        if name in self.bound_now:  # bound again by the statement (stateless.py counts them)
            self.f.binds[name] = self.f.binds.get(name, 1) + 1
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

    def _mutate(self, name, kind, lineno, deep=False, own=False, through=False):
        """`name` may change (`kind`: see MUTATION_RANK); deep: through an element; own: by a
        method not known to change what the object holds (aliases.py); through: changed in
        place through a call's result made from it (`nn.Linear(n).to(d)`: none if state-less)."""
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
                if not through:
                    self.f.through.discard(n)
                elif old is None:
                    self.f.through.add(n)

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

    def _record_binding(self, targets, value, elements=False, stateless_of=None):
        """`targets = value` (or `for targets in value`, `with value as targets`): what the bound
        names may share (aliases.py). elements: the targets are elements of the value.
        stateless_of: the expression whose value the targets get, when `value` stands for it
        (`a = b = 0`: b is bound to a's object); False: not the value itself (`with v as x`
        binds what `v.__enter__()` returns)."""
        names = [t.id if isinstance(t, ast.Name) else n.id for t in targets
                 for n in ((t,) if isinstance(t, ast.Name) else ast.walk(t))
                 if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        if not names:
            return
        if not self.stack and value is not None and stateless_of is not False:
            self._note_stateless(targets, names, stateless_of if stateless_of is not None else value)
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
            if not elements and value is not None and stateless_of is not False:
                iteration_facts(self.f, names, value)
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

    def _note_stateless(self, targets, names, value):
        """Top level: the names bound to a state-less value (stateless.py), and what they are
        state-less given. A starred target (`a, *rest = t`) is a list: not state-less."""
        deps = stateless_deps(value, self.kinds)
        if deps is None:
            return
        for t in targets:
            if not isinstance(t, ast.Name) and any(isinstance(n, ast.Starred) for n in ast.walk(t)):
                return
        rec = self.f.stateless
        for n in names:
            old = rec.get(n)
            rec[n] = (1, deps) if old is None else (old[0] + 1, old[1] | deps)

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

    def visit_Compare(self, node):
        left = node.left
        if (isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id == "get_ipython"
                and not left.args and not left.keywords and self.kinds.get("get_ipython") is None
                and self._lookup("get_ipython") is None and "get_ipython" not in self.bound_now
                and all(isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) for op in node.ops)
                and all(isinstance(c, ast.Constant) and c.value is None for c in node.comparators)):
            # `get_ipython() is None`: whether a kernel runs this code, not a read of names by
            # computed name (a call on what it returns is one, visit_calls); the name is read
            # (the slice's text gets a stand-in for it outside a kernel, result.py).
            self.visit(left.func)
            return
        self.generic_visit(node)

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

    # ---- used by every part --------------------------------------------------------------------
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


_DISPATCH: dict = {}  # node type -> _Visitor method (see _Visitor.visit)


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

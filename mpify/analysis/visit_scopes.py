"""The visitor's scopes: `def`, `lambda`, `class` and comprehensions open one; the walrus binds
past comprehensions; `return` and `yield` say what a function's result may share.

Why a part of its own: these are the nodes that push and pop the scope stack of visitor.py, and
where a function's summary (summaries.py) is made: its locals found before its body is read
(scopes.py), what it changes through them closed when it is popped (aliases.close_function), a
nested function's effects on module names merged into the function that contains it. This class
is a part of `visitor._Visitor`; its methods use that class's state and helpers.
"""
from __future__ import annotations

import ast
import builtins

from mpify.analysis.aliases import close_function, expr_sources
from mpify.analysis.effects import combine_kinds
from mpify.analysis.scopes import Scope, scope_names
from mpify.analysis.summaries import FunctionSummary


class _ScopeVisits:
    """The scope-opening handlers of `visitor._Visitor`, and what a function returns."""

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
            self.f.summaries[node.name] = FunctionSummary(is_class=True, is_iterator=any(
                isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__next__"
                for n in node.body))

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

"""The visitor's statements: assignments, `del`, control flow, `try`, `match`, imports, `await`.

Why a part of its own: a statement's own rules are about when its bindings happen (an `if` body may
not run, an `except E as e` unbinds `e`, `import a.b` binds `a` weakly) and what an assignment
makes its names share (aliases.py); the names themselves go through the scope stack of
visitor.py (`_bind`, `_read`, `_store_target`, `_record_binding`), whose `_Visitor` this class is
a part of. Its methods use that class's state and helpers; it is not used on its own.
"""
from __future__ import annotations

import ast


class _StatementVisits:
    """The statement handlers of `visitor._Visitor`."""

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
                                 else node.value, stateless_of=node.value)
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
            if not self.stack:  # `n += 1` of an int: still an int (stateless.py)
                self._note_stateless([t], [t.id], ast.BinOp(ast.Name(t.id, ast.Load()), node.op, node.value))
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
                self._record_binding([item.optional_vars], item.context_expr, stateless_of=False)
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
                self.f.modules.update(_packages(a.name))
            if a.asname:
                self._bind(a.asname, node.lineno)
            else:
                # `import a.b` binds `a` but other `import a.c` statements stay needed: weak.
                self._bind(root, node.lineno, weak="." in a.name)

    def visit_ImportFrom(self, node):
        if not self.stack and node.module and not node.level:
            self.f.modules.update(_packages(node.module))
            # `from going_modular import data_setup` may load the submodule a cell wrote
            self.f.modules.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
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

    def visit_Await(self, node):
        if not self._later():
            self.f.has_await = True
        self.generic_visit(node)


def _is_name_main(test) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _packages(dotted: str) -> list:
    """The modules `import a.b.c` loads: `a`, `a.b`, `a.b.c`."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]

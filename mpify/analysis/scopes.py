"""Scopes and bindings: what the visitor's scope stack holds, and Python's compile-time rules.

Why a module of its own: which scope owns a name is decided before a function body is visited (a
name bound anywhere in the body is local everywhere in it, unless declared `global`/`nonlocal`),
so the rules that find those names are separate from the traversal that uses them (visitor.py).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

__all__ = ["Scope", "scope_names", "root_name", "dotted", "COMPREHENSIONS", "FUNCS"]


@dataclass(eq=False)
class Scope:
    """One scope on the visitor's stack (the module scope is the statement itself, not a Scope)."""

    kind: str  # 'function' (also lambdas), 'class' or 'comprehension'
    local: set = field(default_factory=set)  # names bound in it (for a class: its attributes)
    globals: set = field(default_factory=set)  # `global` declarations (functions only)
    nonlocals: set = field(default_factory=set)  # `nonlocal` declarations (functions only)
    summary: object = None  # the visitor's FunctionSummary: what calling the function changes
    params: set = field(default_factory=set)  # parameter names, whose mutation the summary records
    # The may-alias relation inside a function body, read flow-insensitively (aliases.py): local
    # name -> refs of what it may share / be derived from. A ref is ('L', local or parameter),
    # ('G', global) or ('O', enclosing function Scope, its name). For a comprehension: target ->
    # the names its iterable reads (an element of them).
    sources: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)
    bindings: list = field(default_factory=list)  # ([local names], aliases.Sources), not yet read
    # Changes made through the scope's own names, resolved to parameters and globals when the
    # function's body has been read (aliases may be bound after the change, in a loop):
    pending: list = field(default_factory=list)  # (name, kind, deep)
    grad_writes: set = field(default_factory=set)  # names a backward runs through
    observed: set = field(default_factory=set)  # names whose gradients are used
    # (callee, [pos arg refs], {kw: refs}) of the notebook functions a function calls; for a
    # comprehension, its generators, until its targets' sources are read (visitor).
    calls: list = field(default_factory=list)


COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def scope_names(nodes) -> tuple[set, set, set]:
    """(names bound, `global` names, `nonlocal` names) of a function body, by Python's
    compile-time rule, not looking into nested scopes. One walk for the three (the benchmark)."""
    out: set = set()
    g: set = set()
    nl: set = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if isinstance(n, (*FUNCS, ast.ClassDef)):
            out.add(n.name)
            continue
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, COMPREHENSIONS):
            # Comprehension targets are the comprehension's own; only walruses bind here.
            out.update(w.target.id for w in ast.walk(n) if isinstance(w, ast.NamedExpr))
            continue
        if isinstance(n, ast.Name):
            if not isinstance(n.ctx, ast.Load):
                out.add(n.id)
            continue
        if isinstance(n, ast.Global):
            g.update(n.names)
        elif isinstance(n, ast.Nonlocal):
            nl.update(n.names)
        elif isinstance(n, ast.Import):
            out.update(a.asname or a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            out.update(a.asname or a.name for a in n.names if a.name != "*")
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            out.add(n.rest)
        elif isinstance(n, ast.NamedExpr):
            out.add(n.target.id)
        stack.extend(ast.iter_child_nodes(n))
    return out, g, nl


def root_name(node) -> str | None:
    """`x` for `x`, `x.a.b`, `x[0].a`; None when the chain starts with a call or literal."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def dotted(node) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None

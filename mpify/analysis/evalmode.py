"""A look at a model is not a change of it: a forward pass in eval mode under `no_grad`.

Why a module of its own: calling a notebook object (`model(xb)`) may change it (effects.py: a
BatchNorm's running statistics, a stateful callable), so a cell that peeks at a model's output,
`model.eval()` then `with torch.no_grad(): out = model(xb)`, was kept in every slice of a target
that trains that model, and with it the batch it looked at (issue 25). In eval mode a module's
forward updates no running statistics and draws no dropout masks, and under `no_grad` (or
`inference_mode`) it records no graph a later backward could run through.

The rule (model._resolve_calls): a statement's calls of a notebook object are not a change of it
when every one of them runs inside `with torch.no_grad():` / `torch.inference_mode():` and the last
top-level statement before it that touched the object was exactly `obj.eval()`. Anything else
that may change the object in between (a call it is passed to, a method, a rebinding), any
`.train(..)` call at all, and any call of a notebook function (either may reach the object
through another name) ends that. A module whose
forward changes its own attributes anyway (a cache it fills) is read as unchanged: the cost of the
rule, said in docs/slicing.md.
"""
from __future__ import annotations

import ast

__all__ = ["no_grad_only_calls", "eval_call", "calls_train"]

_NO_GRAD = frozenset({"no_grad", "inference_mode"})


def _no_grad_context(expr) -> bool:
    """`torch.no_grad()`, `torch.inference_mode()`, `torch.set_grad_enabled(False)`."""
    if not isinstance(expr, ast.Call):
        return False
    name = expr.func.attr if isinstance(expr.func, ast.Attribute) else getattr(expr.func, "id", None)
    if name in _NO_GRAD:
        return not expr.args or (isinstance(expr.args[0], ast.Constant) and expr.args[0].value is True)
    return (name == "set_grad_enabled" and len(expr.args) == 1 and isinstance(expr.args[0], ast.Constant)
            and expr.args[0].value is False)


def no_grad_only_calls(node) -> set:
    """The bare names the statement calls (`model(xb)`) only inside no_grad blocks."""
    inside: set = set()
    outside: set = set()

    def walk(n, no_grad):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return  # a body runs when called, not here
        if isinstance(n, (ast.With, ast.AsyncWith)):
            for item in n.items:
                walk(item.context_expr, no_grad)
            inner = no_grad or any(_no_grad_context(item.context_expr) for item in n.items)
            for b in n.body:
                walk(b, inner)
            return
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            (inside if no_grad else outside).add(n.func.id)
        for child in ast.iter_child_nodes(n):
            walk(child, no_grad)

    walk(node, False)
    return inside - outside


def eval_call(node) -> str | None:
    """`name` when the statement is exactly `name.eval()`."""
    if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not node.value.args
            and not node.value.keywords and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "eval" and isinstance(node.value.func.value, ast.Name)):
        return node.value.func.value.id
    return None


def calls_train(node) -> bool:
    """The statement calls a `.train(..)` method (of any object: it may be the model's alias)."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "train"
               for n in ast.walk(node))

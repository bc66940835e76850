"""State-less values: names whose value no change can reach (issue 25).

Why: a change made through a name reaches every object the name may share (aliases.py), and a
call of a notebook function changes what its body changes (summaries.py). Read without knowing
what a name holds, that kept exploration for values nothing can change: `x = x.to(device)` in a
timing demo read as changing `device` (x may share what `.to(..)` was given), a backward as
writing the gradients of the int `n_feat` a tensor's shape came from, a generator's `next(..)`
over `(.. for i in range(len(data)))` as changing the builtin `len`, an evaluation helper's
`xb = xb.to(device)` as changing `device`. An int, a string, a `torch.device` or a dtype holds no
state: whatever is done to what was built from it leaves it as it was, and rebinding a name
changes nothing it shared.

What is state-less is known from what the name was bound to (`stateless_deps`, by the tables of
effects.py), never guessed:

- a literal (number, string, bytes, bool, None, an f-string), a tuple of state-less values, and
  arithmetic, comparisons, `and`/`or`, conditional expressions of them;
- an element or slice of a state-less value (`X.shape[1]`, `name[:3]`), the elements of a
  `for` over one (`for i in range(n)`);
- a tensor's `shape`, `dtype`, `device`, `ndim` (effects.FRESH_ATTRS), `.item()`, `.numel()`
  (`STATELESS_METHODS`), `len(..)`, `int(..)`, `str(..)`, `range(..)` (`STATELESS_BUILTINS`),
  `max(a, b)` of state-less values (`STATELESS_OF_ARGS`), a string method of a state-less value
  (`STR_METHODS`);
- `torch.device(..)`, `torch.cuda.device_count()` (`STATELESS_MODULE_CALLS`), a module's dtype or
  constant (`torch.float32`, `np.int64`, `math.pi`: `STATELESS_MODULE_ATTRS`);
- a builtin (`len`, `range`) while the notebook does not bind its name.

Names bound by `def`, `class` and `import` are not in this set, though a call changes none of
them: modules, notebook functions and classes are already no value's alias (the model's kinds,
facts._EXTERNAL), a function's or class's attributes can still be set (`helper.calls += 1`, a
`patch(cls)` that adds a method), and a name imported from a module may be any object (`from data
import samples`, a list). A name bound to a list, dict, tensor, model, or anything the tables do
not name keeps the ordinary treatment.

Flow-sensitive, over the top-level statements in order (`StatelessNames`): a name is state-less
from a statement that binds it to a state-less value (every binding of it in that statement, or,
for a conditional one, before it too) until one that binds it otherwise. Read twice, in order:
by model._resolve_calls, where a notebook function's call (its globals, the arguments it is
given), a builtin's and a call on a result made from the name (`nn.Linear(n_feat, 1).to(d)`)
change no state-less name, and by aliases.propagate, which links no name to a state-less one and
records no change of it through another name or a backward. Changes the statement makes itself
(`n.attr = 1`, `n += 1`) are not touched: a rebinding is a definition anyway, and setting an
attribute of an int fails in the notebook too.
"""
from __future__ import annotations

import ast
import builtins

from mpify.analysis.effects import (FRESH_ATTRS, STATELESS_BUILTINS, STATELESS_METHODS,
                                    STATELESS_MODULE_ATTRS, STATELESS_MODULE_CALLS, STATELESS_OF_ARGS,
                                    STR_METHODS)

__all__ = ["stateless_deps", "StatelessNames", "UNCHANGEABLE"]

# The builtins' names: state-less values while the notebook does not bind them.
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))
_NONE: dict = {}  # `after` of a statement that binds and deletes nothing (never written to)
# How a state-less name may still change: a module's state and generator (a seed, a
# configuration call, a draw) is not a change of a value (a module name is never state-less here,
# but a seed call reaching one through a resolved call must stay).
UNCHANGEABLE = frozenset({"direct", "call-arg", "called", "alias", "grad"})
_BOOL_OPS = (ast.In, ast.NotIn, ast.Is, ast.IsNot)


def _builtin(name: str) -> frozenset:
    """The dependency "`name` is still the builtin" (a name followed by `()`: no identifier)."""
    return frozenset((name + "()",))


def _all(nodes, kinds):
    deps = frozenset()
    for n in nodes:
        d = stateless_deps(n, kinds)
        if d is None:
            return None
        deps |= d
    return deps


def stateless_deps(node, kinds) -> frozenset | None:
    """None when the value of `node` may hold state; else the names it is state-less given
    (each must hold a state-less value where it is read; `len()` means "`len` is the builtin").
    kinds: the model's name kinds ('module' for an imported module)."""
    if isinstance(node, (ast.Constant, ast.JoinedStr)):
        return frozenset()
    if isinstance(node, ast.Name):
        return frozenset((node.id,)) if kinds.get(node.id) is None else None
    if isinstance(node, ast.Attribute):
        if node.attr in FRESH_ATTRS:
            return frozenset()  # `x.shape`, `x.dtype`, `x.device`: plain values, whatever x is
        if (node.attr in STATELESS_MODULE_ATTRS and isinstance(node.value, ast.Name)
                and kinds.get(node.value.id) == "module"):
            return frozenset()  # `torch.float32`, `np.pi`
        return None
    if isinstance(node, ast.Subscript):
        return stateless_deps(node.value, kinds)  # an element or a slice of a str or a tuple
    if isinstance(node, ast.Tuple):
        return _all(node.elts, kinds)
    if isinstance(node, ast.Starred):
        return stateless_deps(node.value, kinds)
    if isinstance(node, ast.BinOp):
        if (isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant)
                and isinstance(node.left.value, str)):
            return frozenset()  # `"%d items" % n`: a str, whatever it formats
        return _all((node.left, node.right), kinds)
    if isinstance(node, ast.UnaryOp):
        return stateless_deps(node.operand, kinds)
    if isinstance(node, ast.BoolOp):
        return _all(node.values, kinds)
    if isinstance(node, ast.Compare):
        if all(isinstance(op, _BOOL_OPS) for op in node.ops):
            return frozenset()  # `a in b`, `a is None`: a bool
        return _all([node.left] + node.comparators, kinds)  # `t > 0` of a tensor is a tensor
    if isinstance(node, ast.IfExp):
        return _all((node.body, node.orelse), kinds)
    if isinstance(node, ast.NamedExpr):
        return stateless_deps(node.value, kinds)
    if isinstance(node, ast.Call):
        return _call_deps(node, kinds)
    return None


def _call_deps(node, kinds):
    func = node.func
    if isinstance(func, ast.Name):
        if kinds.get(func.id) is not None:
            return None
        if func.id in STATELESS_BUILTINS:
            return _builtin(func.id)
        if func.id in STATELESS_OF_ARGS:
            args = _all(list(node.args), kinds)
            return None if args is None else args | _builtin(func.id)
        if func.id in ("tuple", "frozenset") and len(node.args) == 1 and isinstance(
                node.args[0], (ast.Tuple, ast.List, ast.Set)):
            args = _all(node.args[0].elts, kinds)  # `frozenset({1, 2})`
            return None if args is None else args | _builtin(func.id)
        return None
    if not isinstance(func, ast.Attribute):
        return None
    if func.attr in STATELESS_METHODS:
        return frozenset()  # `loss.item()`, `x.numel()`
    recv = func.value
    root = recv
    while isinstance(root, ast.Attribute):
        root = root.value
    if (func.attr in STATELESS_MODULE_CALLS and isinstance(root, ast.Name)
            and kinds.get(root.id) == "module"):
        return frozenset()  # `torch.device("cuda")`, `torch.cuda.device_count()`
    if func.attr in STR_METHODS and (
            isinstance(recv, (ast.Constant, ast.JoinedStr))
            or (isinstance(recv, ast.Name) and kinds.get(recv.id) is None)):
        return stateless_deps(recv, kinds)  # `"{}/{}".format(a, b)`, `name.upper()`
    return None


class StatelessNames:
    """Which global names hold a state-less value, as the top-level statements run in order.

    `holds(name)`: before the statement being read; `after(facts)`: for the names that statement
    binds or deletes, whether each holds a state-less value after it; `changeable(name, after)`:
    whether a change made while it runs may reach `name`; `advance(facts, after)`: go past it.
    Reads the visitor's `facts.stateless` (name -> (the number of its bindings in the statement
    that are state-less, the names they are state-less given)) and `facts.binds` (name -> the
    number of its bindings in the statement, where more than one)."""

    __slots__ = ("values", "bound")

    def __init__(self):
        self.values: set = set()  # names bound to a state-less value
        self.bound: set = set()  # builtins' names the notebook has bound or deleted so far

    def holds(self, name) -> bool:
        return name in self.values or (name in _BUILTINS and name not in self.bound)

    def after(self, f) -> dict:
        """Only the names whose state-lessness the statement may change: a name it binds that
        held no state-less value before and holds none after is not listed (the common case:
        `_NONE`, no dict made)."""
        defs = f.defs
        if not f.stateless and not f.dels:
            if defs:
                values = self.values
                for n in defs:
                    if n in values or n in _BUILTINS:
                        return {n: False for n in defs if n in values or n in _BUILTINS}
            return _NONE
        out = {}
        for n, strong in defs.items():
            out[n] = self._binds_stateless(f, n, 0) and (strong or self.holds(n))
        for n in f.dels:
            out[n] = False  # (deleted, or bound and deleted by one statement: not vouched for)
        return out

    def _binds_stateless(self, f, n, depth) -> bool:
        rec = f.stateless.get(n)
        if rec is None or rec[0] != f.binds.get(n, 1):
            return False  # a binding the visitor could not vouch for (a walrus, a call's write)
        for d in rec[1]:
            if d.endswith("()"):
                if d[:-2] in self.bound or d[:-2] in f.defs:
                    return False  # `len` is the notebook's own
            elif d == n or d not in f.defs:
                if not self.holds(d):
                    return False
            elif depth or not (self.holds(d) and self._binds_stateless(f, d, 1)):
                # Bound in the same statement, before or after this read: both values must be.
                return False
        return True

    def advance(self, f, after) -> None:
        if not after:
            return
        values = self.values
        for n, yes in after.items():
            if yes:
                values.add(n)
            else:
                values.discard(n)
        if not _BUILTINS.isdisjoint(after):
            self.bound.update(n for n in after if n in _BUILTINS)

    def touches(self, parts, after) -> bool:
        """Whether a name of `parts` (sets of names) holds a state-less value bound by the
        notebook at the statement whose `after` this is: the common case of a value that reads
        none, told cheaply. (Builtins are left out: no binding of the notebook's makes them an
        object aliases.py could link.)"""
        values = self.values
        for names in parts:
            if names and not (values.isdisjoint(names)
                              and (not after or not any(after.get(n) for n in names))):
                return True
        return False

    def changeable(self, name, after) -> bool:
        """May a change made while a statement runs reach `name`? Not if it holds a state-less
        value there (after the statement, `after`, for the names it binds; before, else)."""
        v = after.get(name)
        if v is not None:
            return not v
        return not (name in self.values or (name in _BUILTINS and name not in self.bound))

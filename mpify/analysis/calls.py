"""How a notebook calls its target: the `--call` expression, and the calls and launches in cells.

Why a module of its own: a training function whose parameters are notebook objects
(`train(model, epochs)`) cannot take its arguments from the command line, yet the notebook always
shows how it calls it: `train(model, 2)`, `notebook_launcher(train, (model,), num_processes=2)`,
`mp.spawn(train, args=(model, 2), nprocs=2)`. This module reads both sides as plain AST (nothing
runs):

- `parse_call("train(model, cfg.epochs, lr=1e-3)")`: the `--call` a user typed, checked to be one
  call of a function by name; the free names it reads are sliced in as the target's own are;
- `find_target_calls(nb, "train")`: every place the notebook calls or launches the target, each with
  the `--call` text that replays it and the number of processes the launch used (the `-n`).

Launchers that pass the process index first (`mp.spawn`, `xmp.spawn`, ignite's
`idist.Parallel(...).run`) get a replay whose first argument reads that index from LOCAL_RANK, which
`mpify run` sets in every rank (the index mp.spawn would pass on one node).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from mpify.analysis.errors import AnalysisError
from mpify.analysis.magics import translate_cell

__all__ = ["CallSpec", "CallExpressionError", "TargetCall", "parse_call", "find_target_calls", "best_call"]


class CallExpressionError(AnalysisError):
    """The `--call` text is not one call of a notebook function by name."""


@dataclass(frozen=True)
class CallSpec:
    """A parsed `--call`. target: the called function's name. names: the free names the arguments
    read (sorted), which the slice must define. source: the call as Python text (normalised)."""

    target: str
    names: tuple
    source: str


def _free_names(node: ast.AST) -> set:
    """Names read by `node` that it does not bind itself. Comprehension and lambda variables are
    bound inside the expression, so `train([m for m in models])` reads `models`, not `m`. (A name
    both bound in a comprehension and read outside it counts as bound: rare in a one-line call.)"""
    read, bound = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (read if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arguments):
            bound.update(a.arg for a in n.posonlyargs + n.args + n.kwonlyargs)
            bound.update(a.arg for a in (n.vararg, n.kwarg) if a is not None)
    return read - bound


def parse_call(text: str) -> CallSpec:
    """Check and read a `--call` expression. Raises CallExpressionError (one line)."""
    example = "like `train(model, 3)` or `train(model, cfg.epochs, lr=1e-3)`"
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise CallExpressionError(f"--call {text!r} does not parse ({e.msg}); give one call, {example}") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise CallExpressionError(f"--call {text!r} is not a call; give one call of a notebook function, {example}")
    if not isinstance(call.func, ast.Name):
        # `model.fit(3)`, `make()(3)`: the called thing is not a notebook function by name, so there
        # is no target to slice; the user can wrap it in a function in the notebook.
        raise CallExpressionError(f"--call must call a notebook function by its name, {example}; "
                                  f"`{ast.unparse(call.func)}` is not a name")
    for n in ast.walk(call):
        if isinstance(n, (ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)):
            raise CallExpressionError(f"--call {text!r}: `{ast.unparse(n)}` cannot be part of the "
                                      f"call; give plain arguments, {example}")
    return CallSpec(call.func.id, tuple(sorted(_free_names(call))), ast.unparse(call))


@dataclass(frozen=True)
class TargetCall:
    """One place where the notebook calls or launches the target.

    cell/lineno: where (1-based cell among all cells, line in the cell). form: 'call' or the
    launcher as written (`notebook_launcher`, `mp.spawn`...). source: the call as written in the
    cell (normalised). replay: the `--call` text that makes the same call of the target. nprocs: the
    launch's process count as source text (`2`, `world_size`), None for a plain call. rank_first:
    the launcher passes the process index as the first argument (replayed from LOCAL_RANK).
    in_def: the call is inside a function or class body (`def main(): mp.spawn(...)`).
    """

    cell: int
    lineno: int
    form: str
    source: str
    replay: str
    nprocs: str | None = None
    rank_first: bool = False
    in_def: bool = False


# Keywords the mpify launchers take for themselves; the others go to fn (engine/launch/ranch.py ranch,
# torchddp/ctx.py torchddp_launch and in_torchddp).
_RANCH_OWN = frozenset({"ctx", "caller_rank", "gather", "timeout", "show_ranks", "nnodes", "node_rank",
                        "master_addr", "master_port", "need", "imports"})
_OWN = {"ranch": _RANCH_OWN, "torchddp_launch": _RANCH_OWN,
        "in_torchddp": _RANCH_OWN | {"world_size", "base_rank", "use_gpu"}}
# Launchers whose signature is (fn, args=(), nprocs): torch.multiprocessing's spawn and
# start_processes, torch_xla's xmp.spawn. Each calls fn(index, *args).
_SPAWNERS = {"spawn": "nprocs", "start_processes": "nprocs"}

# The process index the replay passes where the launcher passed it: mpify run sets LOCAL_RANK in
# every rank, and on one node it is the index mp.spawn passes.
_RANK_FROM_ENV = 'int({os}.environ["LOCAL_RANK"])'


def _arg(call: ast.Call, pos: int, kw: str):
    """The argument given at position `pos` or as keyword `kw`, or None."""
    if pos < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:pos + 1]):
        return call.args[pos]
    return next((k.value for k in call.keywords if k.arg == kw), None)


def _spread(args) -> list[ast.expr]:
    """A launcher's `args` value as arguments of fn: a tuple/list literal gives its items, anything
    else (a variable holding the tuple) is passed on starred."""
    if args is None:
        return []
    if isinstance(args, (ast.Tuple, ast.List)):
        return list(args.elts)
    return [ast.Starred(args, ast.Load())]


def _replay(target: str, args: list, keywords: list, rank: str | None = None) -> str:
    parts = ([rank] if rank else []) + [ast.unparse(a) for a in args] + [
        f"**{ast.unparse(k.value)}" if k.arg is None else f"{k.arg}={ast.unparse(k.value)}" for k in keywords]
    return f"{target}({', '.join(parts)})"


def _is_target(node, target: str) -> bool:
    return isinstance(node, ast.Name) and node.id == target


def _callee(call: ast.Call) -> str:
    """The last name of the called thing: `mp.spawn` -> 'spawn', `ranch` -> 'ranch'."""
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _parallels(tree: ast.AST) -> dict:
    """{name: the `idist.Parallel(...)` call} for `with idist.Parallel(...) as name` and
    `name = idist.Parallel(...)` in the cell (ignite's two ways of holding one)."""
    out = {}
    for n in ast.walk(tree):
        pairs = []
        if isinstance(n, (ast.With, ast.AsyncWith)):
            pairs = [(i.optional_vars, i.context_expr) for i in n.items]
        elif isinstance(n, ast.Assign) and len(n.targets) == 1:
            pairs = [(n.targets[0], n.value)]
        for var, value in pairs:
            if isinstance(var, ast.Name) and isinstance(value, ast.Call) and _callee(value) == "Parallel":
                out[var.id] = value
    return out


def _read(call: ast.Call, target: str, parallels: dict, os_name: str) -> tuple | None:
    """(form, replay, nprocs node, rank_first) when `call` calls or launches `target`, else None."""
    if _is_target(call.func, target):
        return "call", ast.unparse(call), None, False
    name = _callee(call)
    form = ast.unparse(call.func)
    rank = _RANK_FROM_ENV.format(os=os_name)
    if name in _OWN and _is_target(_arg(call, 1, "fn"), target):
        # ranch(nprocs, fn, *args, **kwargs): fn(*args, **kwargs) minus ranch's own keywords
        starred = any(isinstance(a, ast.Starred) for a in call.args[:2])
        args = [] if starred else call.args[2:]
        kws = [k for k in call.keywords if k.arg not in _OWN[name] and k.arg != "fn" and k.arg != "nprocs"]
        return form, _replay(target, args, kws), _arg(call, 0, "nprocs"), False
    if name == "notebook_launcher" and _is_target(_arg(call, 0, "function"), target):
        # accelerate: notebook_launcher(function, args=(), num_processes=None, ...) calls function(*args)
        return form, _replay(target, _spread(_arg(call, 1, "args")), []), _arg(call, 2, "num_processes"), False
    if name in _SPAWNERS and _is_target(_arg(call, 0, "fn"), target):
        # mp.spawn(fn, args=(), nprocs=1) / xmp.spawn(fn, args=(), nprocs=None): fn(index, *args)
        return form, _replay(target, _spread(_arg(call, 1, "args")), [], rank), _arg(call, 2, _SPAWNERS[name]), True
    if name == "run" and isinstance(call.func, ast.Attribute) and call.args and _is_target(call.args[0], target):
        # ignite: idist.Parallel(nproc_per_node=n).run(fn, *args, **kwargs) calls fn(local_rank, *args, **kwargs)
        owner = call.func.value
        parallel = owner if isinstance(owner, ast.Call) and _callee(owner) == "Parallel" else (
            parallels.get(owner.id) if isinstance(owner, ast.Name) else None)
        if parallel is not None:
            nprocs = next((k.value for k in parallel.keywords if k.arg == "nproc_per_node"), None)
            form = f"{ast.unparse(parallel.func)}(...).run"
            return form, _replay(target, call.args[1:], call.keywords, rank), nprocs, True
    return None


def _imports_os(trees) -> bool:
    """Does a cell `import os` at its top level (so a replay can name `os`)?"""
    return any(isinstance(n, ast.Import) and any(a.name == "os" and a.asname is None for a in n.names)
               for tree in trees for n in tree.body)


def find_target_calls(nb, target: str, upto_cell: int | None = None) -> list[TargetCall]:
    """Every call or launch of `target` in the code cells of `nb` (a Notebook) up to cell
    `upto_cell`, in notebook order. Cells that do not parse are passed over (the slicer reports them)."""
    trees = []
    for cell in nb.cells[:upto_cell]:
        if cell.kind != "code":
            continue
        try:
            trees.append((cell.index, ast.parse(translate_cell(cell.source).text)))
        except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
            continue
    # `os` where the notebook imports it; otherwise the replay imports it inline, so that it still
    # names only what the slice can define.
    os_name = "os" if _imports_os(t for _, t in trees) else '__import__("os")'
    found = []
    for index, tree in trees:
        parallels = _parallels(tree)
        defs = {id(n) for d in ast.walk(tree) if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                 ast.ClassDef, ast.Lambda))
                for n in ast.walk(d) if n is not d}
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call):
                continue
            read = _read(n, target, parallels, os_name)
            if read is None:
                continue
            form, replay, nprocs, rank_first = read
            found.append(TargetCall(index, n.lineno, form, ast.unparse(n), replay,
                                    None if nprocs is None else ast.unparse(nprocs), rank_first,
                                    id(n) in defs))
    found.sort(key=lambda c: (c.cell, c.lineno))
    return found


def best_call(calls: list[TargetCall], defined_at: tuple = (0, 0)) -> TargetCall | None:
    """The call a replay should follow: one after the target's last definition `defined_at`
    ((cell, line); an earlier call may be of a superseded draft with another signature), at the
    top level of a cell rather than inside a function (`def main(): mp.spawn(...)`), and the last
    such: the run the notebook settled on."""
    if not calls:
        return None
    return max(calls, key=lambda c: ((c.cell, c.lineno) > defined_at, not c.in_def, c.cell, c.lineno))

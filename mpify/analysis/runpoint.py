"""Where the notebook ran the target: the point a slice is taken at when no cell is given.

Why: the globals a function reads are read when it runs. A notebook that trains with
`notebook_launcher(train, num_processes=4)` and then, in later cells, reloads a tokenizer from the
training's own output folder has two bindings of `tokenizer`; the one `train` used is the one
before the launch, and the later one does not exist on a fresh run. So when the notebook runs the
target (calls it, `train()`, or launches it with any launcher of `effects.LAUNCHERS`:
`notebook_launcher(train)`, `ranch(4, train)`, `mp.spawn(train, ...)`), in the def's own cell or
any later one, the slice is the notebook's state just before that statement: its last such run
after the target's last definition. A run inside a function body (`def main(): mp.spawn(train)`)
happens whenever that function is called, so it fixes no point. A definition after the last run
means the notebook never ran the final version: no point, the slice is as of the notebook's end.
"""
from __future__ import annotations

__all__ = ["last_run", "replayed_run"]

import ast

# Statements whose calls run later, when what they define is called.
_DEFERRED = frozenset({"function", "class", "lambda"})


def last_run(statements: list, target: str, point: int):
    """The last top-level statement before position `point` that calls or launches `target`,
    after every statement that (re)defines it; None when there is none."""
    for s in reversed(statements[:point]):
        f = s.facts
        if target in f.defs:
            return None
        if s.kind not in _DEFERRED and (target in f.called_now or target in f.launches):
            return s
    return None


def replayed_run(statements: list, target: str, point: int, call: str):
    """The last top-level statement before `point`, after the target's last definition, whose
    code makes the call `call` (the `--call` text, compared as syntax: `train(model, 2)` matches
    `losses = train(model,2)`), else the notebook's last run of the target (`last_run`): a `--call`
    replays that run, in the state the notebook had there. None when there is no run."""
    wanted = ast.dump(ast.parse(call, mode="eval").body)
    for s in reversed(statements[:point]):
        f = s.facts
        if target in f.defs:
            break
        if s.kind not in _DEFERRED and target in f.called_now and any(
                isinstance(n, ast.Call) and ast.dump(n) == wanted for n in ast.walk(s.node)):
            return s
    return last_run(statements, target, point)

"""Slice -> Python module text (the payload) -> standalone script, and running it on N ranks.

Public API (used by the CLI and from notebooks):

- `run_notebook(path, fn, nprocs=1, *, ddp=False, backend=None, cell=None, args=(), kwargs=None,
  call=None, faithful=False, **ranch_options)`: run one function of a notebook on N ranks, return
  rank 0's value; `call="train(model, 3)"` calls it with the notebook's own objects.
- `render_payload(slice) -> Payload` (`.text`, `.line_map`), `render_script(slice, ddp=...)`: the
  payload plus a standalone `main()`.
- Errors: `ExportError` and its subclasses (user errors, one-line str); `MissingArgumentsError`
  names the notebook's own call of the target when required parameters were not given.

The modules, one idea each: payload (slice -> module text + line map), signature (target's
parameters -> argparse code), script (payload + main()), tracebacks (payload lines -> notebook
cells), prepare (--fn/--call/--cell -> slice and script text), runner (private module file ->
ranch), replay (missing parameters -> the notebook's own call).

`run_notebook` loads on first use: the runner imports the engine, which `mpify export` and
`mpify deps` never need (they import this package for its errors and renderers).
"""
from mpify.export.errors import (ExportError, MissingArgumentsError, OutputExistsError, TargetArgsError,
                                 UntranslatableError)
from mpify.export.payload import Payload, render_payload
from mpify.export.script import render_script


def __getattr__(name: str):
    if name == "run_notebook":
        from mpify.export.runner import run_notebook

        return run_notebook
    raise AttributeError(f"module 'mpify.export' has no attribute {name!r}")

__all__ = ["run_notebook", "render_payload", "render_script", "Payload", "ExportError",
           "UntranslatableError", "TargetArgsError", "MissingArgumentsError", "OutputExistsError"]

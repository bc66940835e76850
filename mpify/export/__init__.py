"""Slice -> Python module text (the payload) -> standalone script, and running it on N ranks.

Public API (used by the CLI and from notebooks):

- `run_notebook(path, fn, nprocs=1, *, ddp=False, backend=None, cell=None, args=(), kwargs=None,
  **ranch_options)`: run one function of a notebook on N ranks, return rank 0's value.
- `render_payload(slice) -> Payload` (`.text`, `.line_map`), `render_script(slice, ddp=...)`: the
  payload plus a standalone `main()`.
- Errors: `ExportError` and its subclasses (user errors, one-line str).

The modules, one idea each: payload (slice -> module text + line map), signature (target's
parameters -> argparse code), script (payload + main()), tracebacks (payload lines -> notebook
cells), runner (private module file -> ranch).
"""
from mpify.export.errors import ExportError, OutputExistsError, TargetArgsError, UntranslatableError
from mpify.export.payload import Payload, render_payload
from mpify.export.runner import run_notebook
from mpify.export.script import render_script

__all__ = ["run_notebook", "render_payload", "render_script", "Payload", "ExportError",
           "UntranslatableError", "TargetArgsError", "OutputExistsError"]

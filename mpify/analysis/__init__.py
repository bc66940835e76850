"""Notebook analysis: notebook -> statements -> dependency graph -> slice. Pure: reads text, runs nothing.

Public API (used by the export room and the CLI; keep these names and fields stable):

- `load_notebook(path) -> Notebook`: `.path`, `.cells` (each `Cell` has `.index` 1-based among all
  cells, `.kind` 'code'/'markdown'/'raw', `.source`, `.execution_count`), `.warnings`.
- `slice_notebook(path_or_notebook, target, upto_cell=None, *, extra_roots=(), faithful=False,
  at_run=True, replay=None) -> Slice`: `.notebook`, `.target`,
  `.target_kind`, `.items` (`SliceItem`: `.cell`, `.lineno`, `.end_lineno`, `.source_lineno`,
  `.source`, `.reasons`, `.kind`, `.defines`), `.star_imports`, `.unresolved`, `.warnings`,
  `.cells_used`, `.run_at` (the notebook's run of the target the slice is taken before, or None),
  `.ipython` (IPython builtins it uses -> where: `display`, `get_ipython`), `.notes()`,
  `.to_dict()`.
- `render_source(slice) -> str`: the items' sources joined, `# cell K` over each cell's block,
  after a stand-in for each IPython builtin the slice uses (`ipython_standins`, result.py).
- Errors: `AnalysisError` and its subclasses in `mpify.analysis.errors`.

The modules, one idea each: notebook (reading files), magics (IPython syntax -> Python, line for
line), effects (which calls change what: the tables), stars (what a star import supplies, read from
its module's source), diskcache (what was read from a file, kept between runs by its size and
mtime), scopes (the scope stack's entries, Python's binding rules), facts (what the visitor returns
for one statement), visitor (scope-stack facts of one statement: the scope stack and names), with
its parts visit_statements (statements), visit_scopes (def, lambda, class, comprehensions) and
visit_calls (what a call changes), aliases (through which names a change reaches an object),
stateless (the names whose value no change can reach: ints, strings, devices, dtypes, builtins),
summaries (what a call of a notebook function changes, followed through the functions it calls),
model (statements of a notebook, cross-statement call effects), runpoint (where the notebook ran
the target: the slice's default point), slicer (the backward closure), with its parts unresolved
(names no statement defines: builtins, star imports, opaque statements) and caveats (the
warnings), result (the `Slice` it returns, and its text), calls (how the notebook calls or launches
a target, for `--call`), whynot (why a statement is kept or left out: `mpify deps --why`).
"""
from mpify.analysis.errors import (AnalysisError, CellRangeError, NotebookError, SliceSyntaxError,
                                   UnknownTargetError, UnresolvedNameError)
from mpify.analysis.notebook import Cell, Notebook, load_notebook
from mpify.analysis.result import Slice, SliceItem, render_source
from mpify.analysis.slicer import slice_notebook

__all__ = ["load_notebook", "slice_notebook", "render_source", "Notebook", "Cell", "Slice",
           "SliceItem", "AnalysisError", "NotebookError", "UnknownTargetError",
           "UnresolvedNameError", "SliceSyntaxError", "CellRangeError"]

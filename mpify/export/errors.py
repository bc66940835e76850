"""Typed user errors of the export room.

Why a module of its own: like the analyzer's errors, each of these is a *user* mistake (a magic that
cannot become Python, target arguments that do not fit the signature, an output file that exists),
so the CLI turns it into one line `mpify: error: ...` and exit code 2, and a Python caller catches
the type. str() is always one line.
"""
from __future__ import annotations

__all__ = ["ExportError", "UntranslatableError", "TargetArgsError", "MissingArgumentsError",
           "OutputExistsError"]


class ExportError(Exception):
    """Base class: a user mistake found while turning a slice into a module or running it."""

    def __str__(self) -> str:  # one line, always (the CLI prints it as one line)
        return " ".join(str(a) for a in self.args).replace("\n", " ")


class UntranslatableError(ExportError):
    """The slice needs a line that has no Python translation (`x = %timeit -o f()`, `%run a.py`)."""

    def __init__(self, cell: int, lineno: int, message: str):
        self.cell = cell
        self.lineno = lineno
        super().__init__(message)


class TargetArgsError(ExportError):
    """The arguments given to the target (`-- --lr x`) do not fit its signature."""


class MissingArgumentsError(TargetArgsError):
    """Required parameters of the target were not given, and the notebook shows a call of it.

    missing: the parameters' names. site: the notebook's call or launch to replay
    (`mpify.analysis.calls.TargetCall`: cell, source, replay, nprocs, rank_first). str() is one
    line in Python's terms (`call=...`); the CLI words it with its own options (see cli/run.py).
    """

    def __init__(self, target: str, missing: list, site):
        self.target = target
        self.missing = list(missing)
        self.site = site
        n = f", nprocs={site.nprocs}" if site.nprocs else ""
        super().__init__(f"`{target}` needs {', '.join(f'`{m}`' for m in missing)}, which were not "
                         f"given; cell {site.cell} {'calls' if site.form == 'call' else 'launches'} it "
                         f"as `{site.source}`: replay that with call={site.replay!r}, cell={site.cell}{n}")


class OutputExistsError(ExportError):
    """`mpify export -o FILE` would overwrite an existing file and --force was not given."""

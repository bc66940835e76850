"""Typed user errors of the export room.

Why a module of its own: like the analyzer's errors, each of these is a *user* mistake (a magic that
cannot become Python, target arguments that do not fit the signature, an output file that exists),
so the CLI turns it into one line `mpify: error: ...` and exit code 2, and a Python caller catches
the type. str() is always one line.
"""
from __future__ import annotations

__all__ = ["ExportError", "UntranslatableError", "TargetArgsError", "OutputExistsError"]


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


class OutputExistsError(ExportError):
    """`mpify export -o FILE` would overwrite an existing file and --force was not given."""

"""Typed errors of the analyzer.

Why a module of its own: the CLI turns every `AnalysisError` into one line on stderr and exit code 2,
and Python callers (the export room, `mpify run`) catch the same types. So every error here is a
*user* error (a bad notebook, an unknown function, a name nothing defines), and its str() is one clear
line that names the file, cell and line where that helps. Bugs of the analyzer are not AnalysisErrors.
"""
from __future__ import annotations

__all__ = [
    "AnalysisError",
    "NotebookError",
    "UnknownTargetError",
    "UnresolvedNameError",
    "SliceSyntaxError",
    "CellRangeError",
]


class AnalysisError(Exception):
    """Base class: a user mistake found while reading or slicing a notebook. str() is one line."""

    def __str__(self) -> str:  # one line, always (a message with newlines would break the CLI rule)
        return " ".join(str(a) for a in self.args).replace("\n", " ")


class NotebookError(AnalysisError):
    """The file is missing, not JSON, not a notebook, or an invalid notebook."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class UnknownTargetError(AnalysisError):
    """The target name is not defined in the notebook (before the chosen cell).

    `.suggestions` holds close matches (difflib) among the names the notebook defines.
    """

    def __init__(self, target: str, message: str, suggestions: list[str] | None = None):
        self.target = target
        self.suggestions = list(suggestions or [])
        if self.suggestions:
            message += "; did you mean " + " or ".join(f"`{s}`" for s in self.suggestions) + "?"
        super().__init__(message)


class UnresolvedNameError(AnalysisError):
    """A name the target needs that nothing defines before its use and no star import may supply."""

    def __init__(self, name: str, message: str, cell: int | None = None, lineno: int | None = None):
        self.name = name
        self.cell = cell
        self.lineno = lineno
        super().__init__(message)


class SliceSyntaxError(AnalysisError):
    """A cell the slice needs does not parse (even after IPython's transformations)."""

    def __init__(self, cell: int, lineno: int | None, message: str):
        self.cell = cell
        self.lineno = lineno
        super().__init__(message)


class CellRangeError(AnalysisError):
    """`--cell K` is not a cell of the notebook."""

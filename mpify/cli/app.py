"""The typer application. Each command lives in its own module and registers itself here.

The CLI is thin: it parses options, calls the rooms (analysis, export, engine) and prints. User
mistakes become one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="mpify",
    help="Run one function out of a notebook on N ranked processes, or export it as a DDP script.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Run one function out of a notebook on N ranked processes, or export it as a DDP script."""
    # An explicit callback keeps `mpify deps ...` a subcommand even while it is the only one.


def main() -> None:
    """Console-script entry point."""
    from mpify.cli import commands  # noqa: F401  (registers the commands on `app`)

    app()

"""The commands of the `mpify` CLI, as plain functions with the typer settings each needs.

Why a list here: app.py registers these functions on the typer app, and the command modules import
nothing of the CLI's own, so imports run one way (app -> commands -> deps, run, export) instead of
each command module importing `app` to decorate itself while `app` imports the commands.
"""
from mpify.cli.deps import deps
from mpify.cli.export import export
from mpify.cli.run import CONTEXT_SETTINGS, run

# (function, keywords of typer's `app.command`); the command's name is the function's.
COMMANDS = [(deps, {}), (run, {"context_settings": CONTEXT_SETTINGS}), (export, {})]

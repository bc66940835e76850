"""The typer application: it registers the command functions listed in commands.py.

The CLI is thin: it parses options, calls the rooms (analysis, export, engine) and prints. User
mistakes become one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import typer

from mpify.cli.commands import COMMANDS

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


for _command, _settings in COMMANDS:
    app.command(**_settings)(_command)


def main() -> None:
    """Console-script entry point. Click's own parse errors (an unknown option, a missing
    argument, a bad number) become one line too, instead of a usage box."""
    import sys

    try:  # typer >= 0.23 carries its own copy of click; older ones use click itself
        from typer._click.exceptions import NoSuchOption, UsageError
    except ImportError:
        from click.exceptions import NoSuchOption, UsageError

    from mpify.cli.coercion import convert_plainly

    # The click command typer builds (what `app()` runs), with plain converters for its options.
    cli = typer.main.get_command(app)
    convert_plainly(cli)
    if len(sys.argv) < 2:  # bare `mpify`: the help, as typer prints it
        cli()
        return
    try:
        code = cli(standalone_mode=False)
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "mpify"
        if command == "mpify" and sys.argv[1] in cli.commands:
            command = f"mpify {sys.argv[1]}"  # an option's missing value is reported by the root
        hint = f"`{command} --help` lists its options"
        if isinstance(exc, NoSuchOption) and command.endswith(" run"):
            hint = f"the target's own options go after `--` ({command} NB --fn F -- --lr 0.1)"
        print(f"mpify: error: {exc.format_message().rstrip('.')}; {hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C while click itself was parsing
        print("mpify: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

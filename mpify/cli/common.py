"""What the commands share: the one-line user error, the options that choose what is sliced, and
shell quoting for the command lines mpify suggests. Imports nothing of the CLI's own."""
from __future__ import annotations

import shlex
import sys
from typing import NoReturn

import typer

CALL_HELP = ("The call to make, as a cell would write it, with the notebook's own objects as "
             "arguments: \"train(model, 3)\". --fn may then be left out.")
CELL_HELP = ("Slice as of the end of cell K (1-based, all cells counted, markdown included). Without "
             "it, as of the notebook's last run (call or launch) of the function, or its end.")
FAITHFUL_HELP = ("Slice conservatively: keep every call on a module the target uses and every "
                 "random draw, for exact reproduction of the notebook's numbers.")


def fail(msg: str, code: int = 2) -> NoReturn:
    """A user error: one line on stderr, exit code 2."""
    print(f"mpify: error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def replay_options(site) -> list:
    """The options that replay the notebook's call or launch `site` (a TargetCall): the call, and
    the cell it is in, so that the slice is the notebook's state at that call, not at its end
    (a later cell may build another model, with imports of its own)."""
    return [f"--call {shell_word(site.replay)}", f"--cell {site.cell}"]


def shell_word(text: str) -> str:
    """`text` quoted for a POSIX shell, the way a person would: single quotes, or double quotes
    when the text holds single quotes and nothing a shell expands inside double quotes."""
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)

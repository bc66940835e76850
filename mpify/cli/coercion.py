"""Plain option values (str, int, float, bool and their Optional) converted without pydantic.

Why: typer 0.2x converts every option value through a pydantic `TypeAdapter`, built on first use;
importing pydantic for that took 0.15 s of every `mpify deps` and `mpify export`, half of the
whole command, to turn "2" into 2. mpify's own options are all plain types, so each parameter of
the command is given a converter that calls the type itself (`int("2")`), with click's message
for a bad value. Any other annotation (and typer releases that convert through click types, with
no such hook) is left to typer. This touches only the parameters of mpify's own command, never
typer's classes.
"""
from __future__ import annotations

import types
import typing

__all__ = ["convert_plainly"]

_PLAIN = {str: "text", int: "integer", float: "float", bool: "boolean"}
# A flag's value is a bool already; these spellings are click's, for a boolean given as text.
_BOOLS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True,
          "0": False, "false": False, "f": False, "no": False, "n": False, "off": False}


def _plain(annotation):
    """`int` for `int` or `Optional[int]` (either spelling), else None."""
    if annotation in _PLAIN:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN:
            return args[0]
    return None


class _PlainConversion:
    """What typer's RuntimeParam does for a plain type: None stays None, a value of the type
    stays, anything else goes through the type or is a BadParameter (click's wording)."""

    def __init__(self, kind: type, bad_parameter: type):
        self.kind = kind
        self.bad_parameter = bad_parameter

    def coerce(self, value, param, ctx):
        if value is None or isinstance(value, self.kind):
            return value
        try:
            if self.kind is bool:
                return _BOOLS[str(value).strip().lower()]
            return self.kind(value)
        except (TypeError, ValueError, KeyError):
            raise self.bad_parameter(f"{value!r} is not a valid {_PLAIN[self.kind]}.", ctx=ctx,
                                     param=param) from None


def convert_plainly(command) -> None:
    """Give every plain-typed parameter of `command` (a click command or group built by typer,
    subcommands included, and the `--help` option click makes for each) its plain converter."""
    try:
        from typer._click.exceptions import BadParameter
    except ImportError:  # a typer without its own click: it converts through click's types
        return

    def plain(p):
        desc = getattr(p, "type_descriptor", None)
        if p is None or desc is None or getattr(p, "_runtime_param", "absent") is not None:
            return p
        kind = _plain(desc.annotation)
        if kind is not None and getattr(desc, "choices", None) is None and not getattr(desc, "is_ranged", False):
            p._runtime_param = _PlainConversion(kind, BadParameter)
        return p

    for sub in [command, *getattr(command, "commands", {}).values()]:
        for p in sub.params:
            plain(p)
        make_help = getattr(sub, "get_help_option", None)
        if make_help is not None:  # made per context, after this: convert it when it is made
            sub.get_help_option = lambda ctx, make_help=make_help: plain(make_help(ctx))

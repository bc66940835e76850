"""Imports every command module so that each registers itself on the typer app."""
from mpify.cli import deps  # noqa: F401
from mpify.cli import export, run  # noqa: F401,E402

"""Imports every command module so that each registers itself on the typer app."""
from mpify.cli import deps  # noqa: F401

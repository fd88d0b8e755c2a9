"""The `mesh402` command line: one typer app (`main.py`), a thin module per command group."""

from mesh402.cli.main import app, main

__all__ = ["app", "main"]

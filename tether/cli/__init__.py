"""The `tether` command line: one entry point, one sub-command module per part.

Each module listed in `_COMMAND_MODULES` defines `register(app: typer.Typer) -> None`
and imports heavy dependencies (torch, transformers) inside its commands, so that
`tether --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

import tether

_COMMAND_MODULES: tuple[str, ...] = (
    "tether.cli._models",
    "tether.cli._generate",
    "tether.cli._chat",
    "tether.cli._serve",
    "tether.cli._router",
    "tether.cli._split",
    "tether.cli._keys",
    "tether.cli._bench",
)

app = typer.Typer(
    name="tether",
    help="Edge-cloud collaborative LLM inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tether {tether.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Edge-cloud collaborative LLM inference."""


for _module in _COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Console-script entry point."""
    app()

"""`tether bench`: the benchmarks live beside the product in a source checkout, not in the wheel.

The command finds the checkout this package was installed from (an editable install) and
loads its `benchmarks` package, which registers one sub-command per benchmark. Installed
from a wheel there is no lab to run: the command says how to get one, in one line.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import typer

__all__ = ["checkout_root", "import_lab", "register"]

_NO_CHECKOUT = (
    "tether bench runs from a source checkout: clone the repository, then "
    "pip install -e '.[test]' and run tether bench there"
)


def checkout_root() -> Optional[Path]:
    """The source checkout this package runs from (it holds benchmarks/), or None for a wheel."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "benchmarks" / "__init__.py").is_file():
        return root
    return None


def _on_path(root: Path) -> None:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def import_lab(module: str) -> ModuleType:
    """Import `benchmarks.lab.<module>` (training data tooling) from the source checkout.

    Raises:
        typer.Exit: (code 2, after a one-line error) when running from a wheel.
    """
    root = checkout_root()
    if root is None:
        typer.echo(f"error: {_NO_CHECKOUT.replace('tether bench', 'this command')}", err=True)
        raise typer.Exit(2)
    _on_path(root)
    return importlib.import_module(f"benchmarks.lab.{module}")


def register(app: typer.Typer) -> None:
    """Add `tether bench` to the root command."""
    root = checkout_root()
    if root is None:

        @app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
        def bench_unavailable() -> None:
            """Benchmarks (only in a source checkout)."""
            typer.echo(f"error: {_NO_CHECKOUT}", err=True)
            raise typer.Exit(2)

        return
    _on_path(root)
    from benchmarks import bench_app

    app.add_typer(bench_app, name="bench")

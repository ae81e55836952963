"""benchmarks: the lab beside the product, behind `tether bench` (not part of the wheel).

Each module in `BENCH_MODULES` defines `register(bench_app: typer.Typer) -> None` adding its
command (imports of torch, websockets... stay inside the command); `benchmarks._report`
holds the shared JSON and docs/benchmarks.md writers. `tether bench` finds this folder in a
source checkout (see `tether.cli._bench`).
"""

from __future__ import annotations

import importlib

import typer

__all__ = ["BENCH_MODULES", "bench_app"]

BENCH_MODULES: tuple[str, ...] = (
    "benchmarks.protocol",
    "benchmarks.serve",
    "benchmarks.speculative",
    "benchmarks.routing",
    "benchmarks.minions",
    "benchmarks.runtime",
    "benchmarks.split",
    "benchmarks.soak",
)

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: results go to benchmarks/results/<name>.json and docs/benchmarks.md.",
    no_args_is_help=True,
)

for _module in BENCH_MODULES:
    importlib.import_module(_module).register(bench_app)

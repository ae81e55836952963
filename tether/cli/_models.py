"""`tether models`: list, verify, locate and clean the models and their cache entries.

Registered by `tether.cli`; heavy imports (transformers, torch) stay inside the commands
that need them, so `tether --help` and `tether models list` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

models_app = typer.Typer(
    name="models",
    help="The model registry: list, verify, locate and clean cached weights.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _human(size: int | float | None) -> str:
    """Bytes as three significant digits: 98.4 MB, 491 MB, 1.12 GB."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 999.5 or unit == "GB":
            break
        value /= 1000
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=stderr)


def _role(name: str) -> str:
    from tether import models

    if name == models.DEFAULT_EDGE_MODEL:
        return "edge"
    if name == models.DEFAULT_CLOUD_MODEL:
        return "cloud"
    return ""


def _list() -> None:
    from rich.table import Table

    from tether import models
    from tether.paths import cache_dir

    table = Table(title=f"Tether models (cache: {cache_dir()})", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("install state", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("GGUF", no_wrap=True)
    table.add_column("HF dir", no_wrap=True)
    for spec in models.registry():
        state, _detail = models.install_state(spec)
        status = models.cache_status(spec.name)
        colour = {"installed": "green", "not installed": "dim"}.get(state.value, "red")
        size = _human(spec.size) if spec.size is not None else f"~{_human(spec.approx_size)}"
        table.add_row(
            spec.name,
            _role(spec.name),
            f"[{colour}]{state.value}[/{colour}]",
            size,
            "assembled" if status.assembled else "-",
            "converted" if status.converted else "tokenizer" if status.tokenizer_cached else "-",
        )
    console = _console()
    console.print(table)
    not_installed = [s for s in models.registry() if models.install_state(s)[0].value != "installed"]
    for spec in not_installed:
        console.print(f"  [dim]{spec.name}: {spec.install_command}[/dim]", soft_wrap=True)


@models_app.callback()
def _models(ctx: typer.Context) -> None:
    """The model registry: list, verify, locate and clean cached weights."""
    if ctx.invoked_subcommand is None:
        _list()


@models_app.command("list")
def list_() -> None:
    """List the registry: role, install state, size and what is cached."""
    _list()


@models_app.command()
def verify(
    names: Annotated[
        Optional[list[str]],
        typer.Argument(help="Registry names; default: the default edge and cloud models."),
    ] = None,
    tokenizers: Annotated[
        bool,
        typer.Option(help="Also check that the edge and cloud tokenizers are identical."),
    ] = True,
) -> None:
    """Assemble if needed and check SHA-256s; check that the edge and cloud tokenizers agree.

    Exits with status 1 if any check fails.
    """
    from rich.table import Table

    from tether import models

    console = _console()
    chosen = list(names) if names else [models.DEFAULT_EDGE_MODEL, models.DEFAULT_CLOUD_MODEL]
    try:
        for name in chosen:
            models.get_spec(name)
    except models.ModelError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc

    results = [models.verify(name) for name in chosen]
    failed = False
    table = Table(title="Weights", title_justify="left")
    for column in ("model", "check", "result", "detail"):
        table.add_column(column)
    for r in results:
        failed |= not r.ok
        detail = f"{_human(r.size)}, sha256 {r.actual_sha256[:12]}… as pinned" if r.ok and r.actual_sha256 else ""
        table.add_row(r.name, "sha256", "[green]PASS[/green]" if r.ok else "[red]FAIL[/red]", detail or r.problem or "")
        for note in r.notes:
            table.add_row("", "", "", f"[yellow]{note}[/yellow]")
    console.print(table)

    ok_names = {r.name for r in results if r.ok}
    pair = (models.DEFAULT_EDGE_MODEL, models.DEFAULT_CLOUD_MODEL)
    if tokenizers and all(n in ok_names for n in pair):
        comparison = models.compare_tokenizers(*pair)
        tok_table = Table(title=f"Tokenizers: {pair[0]} vs {pair[1]}", title_justify="left")
        for column in ("check", "result", "detail"):
            tok_table.add_column(column)
        for check in comparison.checks:
            verdict = "[green]PASS[/green]" if check.ok else "[red]FAIL[/red]" if check.required else "[yellow]WARN[/yellow]"
            tok_table.add_row(check.name, verdict, check.detail)
        console.print(tok_table)
        failed |= not comparison.ok
    elif tokenizers and any(n in chosen for n in pair):
        console.print("[yellow]tokenizer check skipped: it needs both default models to pass[/yellow]")
        failed = True

    if failed:
        console.print("[red bold]FAIL[/red bold]")
        raise typer.Exit(1)
    console.print("[green bold]PASS[/green bold]")


@models_app.command()
def path(
    name: Annotated[str, typer.Argument(help="A registry name, a .gguf file or an HF model directory.")],
    gguf: Annotated[bool, typer.Option("--gguf", help="Print the assembled GGUF file instead.")] = False,
) -> None:
    """Print the model's Hugging Face directory, converting it first if needed."""
    from tether import models

    try:
        result = models.ensure_gguf(name) if gguf else models.ensure_hf_dir(name)
    except models.ModelError as exc:
        _console(stderr=True).print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    typer.echo(str(result))


@models_app.command()
def clean(
    name: Annotated[Optional[str], typer.Argument(help="A registry name or a cached local GGUF's name.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Delete every model entry in the cache.")] = False,
) -> None:
    """Delete a model's cache entries (assembled GGUF, converted weights, tokenizer)."""
    from tether import models

    console = _console()
    if (name is None) == (not all_):
        console.print("[red]error:[/red] give a model NAME or --all (not both)")
        raise typer.Exit(2)
    removed = models.clean(name)
    if not removed:
        console.print(f"nothing cached for {name!r}" if name else "the cache holds no model entries")
        return
    for entry, freed in removed:
        console.print(f"removed {entry} ({_human(freed)})", soft_wrap=True)
    console.print(f"freed {_human(sum(f for _, f in removed))}")


def register(app: typer.Typer) -> None:
    """Add the `models` sub-command group to the `tether` application."""
    app.add_typer(models_app, name="models")

"""`tether generate`: one generation from the command line, streamed and coloured by origin.

Registered by `tether.cli`; heavy imports (torch, models) happen inside the command.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

ORIGIN_STYLES = {
    "edge-accepted": "green",
    "cloud-corrected": "bold red",
    "cloud-generated": "cyan",
    "edge-only": "magenta",
}


def _draft_length(value: str) -> str | int:
    if value in ("adaptive", "heuristic"):
        return value
    try:
        k = int(value)
    except ValueError:
        raise typer.BadParameter("use 'adaptive', 'heuristic' or a number of tokens") from None
    if k < 1:
        raise typer.BadParameter("a fixed draft length must be >= 1")
    return k


def generate(
    prompt_arg: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="The prompt (or use --prompt).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt.")] = None,
    mode: Annotated[str, typer.Option("--mode", "-m", help="edge, cloud or speculative.")] = "speculative",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass (1 disables).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Top-k (0 disables).")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (sampling).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, token_ids, stats.")] = False,
    server: Annotated[Optional[str], typer.Option("--server", help="Cloud URL (ws://host:port); default: in-process.")] = None,
    server_key: Annotated[Optional[str], typer.Option("--server-key", help="The server's public key (base64, or its public.key file) or its SHA256: fingerprint.")] = None,
    edge_model: Annotated[Optional[str], typer.Option("--edge-model", help="Edge model name or path.")] = None,
    cloud_model: Annotated[Optional[str], typer.Option("--cloud-model", help="Cloud model (in-process cloud).")] = None,
    edge_backend: Annotated[str, typer.Option("--edge-backend", help="torch, onnx-int4, onnx-int8, onnx-fp32.")] = "torch",
    draft_length: Annotated[str, typer.Option("--draft-length", help="adaptive, heuristic or a fixed k.")] = "adaptive",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Edge compute threads.")] = None,
    color: Annotated[bool, typer.Option("--color/--no-color", help="Colour tokens by origin.")] = True,
    show_stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Print a stats line after the text.")] = True,
) -> None:
    """Generate text in one mode; tokens are coloured by origin.

    Colours: green edge-accepted, red cloud-corrected, cyan cloud-generated, magenta edge-only.
    """
    from rich.console import Console

    from tether.edge import Client, SpeculativeOptions
    from tether.edge._types import MODES
    from tether.errors import TetherError

    text_prompt = prompt if prompt is not None else prompt_arg
    if text_prompt is None:
        raise typer.BadParameter("give a PROMPT argument or --prompt")
    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}")
    if (server is None) != (server_key is None):
        raise typer.BadParameter("--server and --server-key go together")
    err = Console(stderr=True)
    out = Console(highlight=False, soft_wrap=True, no_color=not color)
    options = SpeculativeOptions(draft_length=_draft_length(draft_length))
    try:
        if server is not None:
            client = Client.connect(server, server_key=server_key or "", edge_model=edge_model,
                                    edge_backend=edge_backend, edge_threads=threads, speculative=options)
        elif mode == "edge":
            client = Client.edge_only(edge_model, backend=edge_backend, threads=threads)
        else:
            client = Client.local(edge_model, cloud_model, edge_backend=edge_backend, edge_threads=threads,
                                  speculative=options)
    except TetherError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    try:
        kwargs = dict(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, seed=seed, stop=stop or None, system=system,
                      chat_template=False if raw else None)
        if as_json:
            result = client.generate(text_prompt, **kwargs)
            payload = {"mode": mode, **result.to_dict()}
            sys.stdout.write(json.dumps(payload) + "\n")
            return
        with client.stream(text_prompt, **kwargs) as gen:
            for tok in gen:
                out.print(tok.text, style=ORIGIN_STYLES[tok.origin.value] if color else None, end="")
            out.print()
            result = gen.result
        if show_stats:
            s = result.stats
            parts = [f"{s.completion_tokens} tokens", f"{s.wall_s:.2f}s",
                     f"{(s.tokens_per_s or 0):.1f} tok/s", f"mode {mode}"]
            if s.acceptance_rate is not None:
                parts.append(f"acceptance {s.acceptance_rate:.0%}")
            if s.cloud_passes_per_token is not None and mode != "edge":
                parts.append(f"cloud passes/token {s.cloud_passes_per_token:.2f}")
            if s.degraded:
                parts.append("degraded (cloud unreachable)")
            err.print("[dim]" + " · ".join(parts) + "[/dim]")
    except TetherError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        client.close()


def register(app: typer.Typer) -> None:
    """Add `tether generate` to the command line."""
    app.command("generate")(generate)

"""`tether generate`: one generation from the command line, streamed and coloured by origin.

Registered by `tether.cli`; heavy imports (torch, models) happen inside the command. The
modes, their flags and colours come from `tether.edge.MODE_REGISTRY` (see `_options.py`).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from tether.cli import _options as opt
from tether.cli._options import ModeCommand, ModeKnobs, fail, open_client, validate


def generate(
    prompt_arg: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="The prompt (or use --prompt).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt.")] = None,
    mode: opt.ModeOpt = "speculative",
    max_new_tokens: opt.MaxNewTokensOpt = 256,
    temperature: opt.TemperatureOpt = 0.0,
    top_p: opt.TopPOpt = 1.0,
    top_k: opt.TopKOpt = 0,
    seed: opt.SeedOpt = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    system: opt.SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, token_ids, stats.")] = False,
    server: opt.ServerOpt = None,
    server_key: opt.ServerKeyOpt = None,
    keys: opt.KeysOpt = None,
    token_env: opt.TokenEnvOpt = None,
    edge_model: opt.EdgeModelOpt = None,
    cloud_model: opt.CloudModelOpt = None,
    edge_backend: opt.EdgeBackendOpt = "torch",
    threads: opt.ThreadsOpt = None,
    draft_length: opt.DraftLengthOpt = "adaptive",
    threshold: opt.ThresholdOpt = None,
    cloud_fraction: opt.CloudFractionOpt = None,
    router: opt.RouterOpt = None,
    split_layer: opt.SplitLayerOpt = None,
    compression: opt.CompressionOpt = None,
    exit_threshold: opt.ExitThresholdOpt = None,
    color: opt.ColorOpt = True,
    show_stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Print a stats line after the text.")] = True,
) -> None:
    """Generate text in one mode; tokens are coloured by origin (the legend is printed to stderr).

    Every flag is checked before a model loads: bad input is one `error:` line and exit code 2.
    """
    text_prompt = prompt if prompt is not None else prompt_arg
    if text_prompt is None:
        fail("give a PROMPT argument or --prompt")
    knobs = ModeKnobs(draft_length=draft_length, threshold=threshold, cloud_fraction=cloud_fraction, router=router,
                      split_layer=split_layer, compression=compression, exit_threshold=exit_threshold)
    settings = validate(mode=mode, knobs=knobs, temperature=temperature, top_p=top_p, top_k=top_k, server=server,
                        server_key=server_key, keys=keys, token_env=token_env, strict_knobs=True)

    from rich.console import Console

    from tether.edge import ORIGIN_STYLES, GenerateOptions
    from tether.errors import TetherError

    spec = settings.mode
    options = GenerateOptions(
        mode=spec.name, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop or None, system=system, chat_template=False if raw else None,
        **({spec.options_field: settings.options_for(spec.name)} if spec.options_field else {}),
    )
    err = Console(stderr=True)
    out = Console(highlight=False, soft_wrap=True, no_color=not color)
    client = open_client(settings, edge_model=edge_model, cloud_model=cloud_model, edge_backend=edge_backend,
                         threads=threads, edge_only=not spec.needs_cloud and server is None)
    try:
        if as_json:
            result = client.generate(text_prompt, options)
            payload = {"mode": spec.name, **result.to_dict()}
            sys.stdout.write(json.dumps(payload) + "\n")
            return
        with client.stream(text_prompt, options) as gen:
            for tok in gen:
                out.print(tok.text, style=ORIGIN_STYLES[tok.origin] if color else None, end="")
            out.print()
            result = gen.result
        if show_stats:
            s = result.stats
            parts = [f"{s.completion_tokens} tokens", f"{s.wall_s:.2f}s",
                     f"{(s.tokens_per_s or 0):.1f} tok/s", f"mode {spec.name}"]
            if s.acceptance_rate is not None:
                parts.append(f"acceptance {s.acceptance_rate:.0%}")
            if s.cloud_passes_per_token is not None and spec.needs_cloud:
                parts.append(f"cloud passes/token {s.cloud_passes_per_token:.2f}")
            if s.degraded:
                parts.append("degraded (cloud unreachable)")
            err.print("[dim]" + " · ".join(parts) + "[/dim]")
            if color:
                err.print(" ".join(f"[{ORIGIN_STYLES[o]}]■ {o.value}[/]" for o in spec.origins))
    except TetherError as exc:
        fail(str(exc), code=1)
    finally:
        client.close()


def register(app: typer.Typer) -> None:
    """Add `tether generate` to the command line."""
    app.command("generate", cls=ModeCommand)(generate)


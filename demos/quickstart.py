"""Quickstart: the embedded default pair, one question in three modes.

    python demos/quickstart.py ["your prompt"] [--edge-model DIR --cloud-model DIR]

The edge model runs here and the cloud service starts in this process (offline). The same
greedy answer comes out of ``cloud`` and ``speculative`` mode; speculative mode gets it with
fewer cloud forward passes because the edge drafts and the cloud only verifies.
"""

from __future__ import annotations

import sys

from _common import console, parser, show_stream

from tether.edge import Client


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="Write a Python function that checks whether a number is prime.")
    args = p.parse_args(argv)

    with Client.local(args.edge_model, args.cloud_model) as client:
        console.print("[bold]speculative[/bold] (the edge drafts, the cloud verifies):")
        with client.stream(args.prompt, mode="speculative", max_new_tokens=args.max_new_tokens) as gen:
            show_stream(gen)
        spec = gen.result
        s = spec.stats
        console.print(f"[dim]{s.completion_tokens} tokens, acceptance {s.acceptance_rate or 0:.0%}, "
                      f"{s.cloud_forward_passes} cloud forward passes, {s.tokens_per_s or 0:.1f} tok/s[/dim]\n")

        cloud = client.generate(args.prompt, mode="cloud", max_new_tokens=args.max_new_tokens)
        console.print(f"[bold]cloud[/bold]: {cloud.stats.cloud_forward_passes} cloud forward passes; "
                      f"same tokens as speculative: [bold]{cloud.token_ids == spec.token_ids}[/bold]")

        edge = client.generate(args.prompt, mode="edge", max_new_tokens=args.max_new_tokens)
        console.print(f"[bold]edge[/bold] alone: {edge.stats.tokens_per_s or 0:.1f} tok/s, nothing left the device; "
                      f"same as the cloud's answer: {edge.token_ids == cloud.token_ids}")
    return 0 if cloud.token_ids == spec.token_ids else 1


if __name__ == "__main__":
    sys.exit(main())

"""Split computing: the device runs the first layers of the cloud's model and sends hidden states.

    python demos/split_computing.py [--split-layer 4] [--compression int8] [--edge-model DIR --cloud-model DIR]

No token ids leave the device, only (compressed) hidden rows; they are not encrypted-at-rest
secrets, though: hidden states can be inverted, see docs/split.md. With fp32 rows the
output equals the cloud model's; int8 rows are a quarter of the size and usually agree.
"""

from __future__ import annotations

import sys

from _common import console, parser, show_stream

from tether.edge import Client, SplitOptions


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--split-layer", default="2", help="layers the device runs, or 'auto'")
    p.add_argument("--compression", default="int8", help="fp32, fp16, bf16, int8 or int4")
    p.add_argument("--prompt", default="Write a Python function that computes a factorial.")
    args = p.parse_args(argv)
    k = args.split_layer if args.split_layer == "auto" else int(args.split_layer)

    with Client.local(args.edge_model, args.cloud_model) as client:
        options = SplitOptions(split_layer=k, compression=args.compression)
        with client.stream(args.prompt, mode="split", max_new_tokens=args.max_new_tokens, split=options) as gen:
            show_stream(gen)
        s = gen.result.stats
        console.print(f"[dim]split layer {s.split_layer}, {s.compression} rows: {s.hidden_rows_sent} rows "
                      f"in {s.hidden_bytes_sent} bytes ({s.hidden_bytes_sent / max(1, s.hidden_rows_sent):.0f} "
                      f"bytes/row), {s.messages} requests[/dim]")
        exact = client.generate(args.prompt, mode="split", max_new_tokens=args.max_new_tokens,
                                split=SplitOptions(split_layer=k, compression="fp32"))
        cloud = client.generate(args.prompt, mode="cloud", max_new_tokens=args.max_new_tokens)
        console.print(f"fp32 rows give the cloud's tokens: [bold]{exact.token_ids == cloud.token_ids}[/bold]; "
                      f"{args.compression} rows agree on {_agree(gen.result.token_ids, cloud.token_ids)} "
                      f"of {len(cloud.token_ids)} tokens")
    return 0 if exact.token_ids == cloud.token_ids else 1


def _agree(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())

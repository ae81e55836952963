"""Connect to a remote `tether serve` over the encrypted protocol (the asyncio SDK).

Start a server (it prints its URL and the key to pin):

    tether keys generate ./server-keys
    tether serve --model qwen2.5-coder-1.5b --keys ./server-keys --port 8765

then, on the device:

    python demos/remote_server.py ws://127.0.0.1:8765 --server-key <printed key> [--edge-model DIR]

The edge model runs here; only token ids (and, when sampling, draft probabilities) travel,
inside a Noise channel pinned to the server's key (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import sys

from _common import console, parser, show_stream

from tether.edge import EdgeClient, StreamToken


async def run(url: str, server_key: str, edge_model: str | None, prompt: str, max_new_tokens: int) -> int:
    client = await EdgeClient.connect(url, server_key=server_key, edge_model=edge_model)
    async with client:
        gen = client.stream(prompt, mode="speculative", max_new_tokens=max_new_tokens)
        tokens: list[StreamToken] = [tok async for tok in gen]
        show_stream(tokens)
        s = gen.result.stats
    rtt = f"{s.rtt_s * 1000:.1f} ms" if s.rtt_s is not None else "-"
    console.print(f"[dim]{s.completion_tokens} tokens in {s.rounds} round trips (median rtt {rtt}), "
                  f"acceptance {s.acceptance_rate or 0:.0%}, {s.bytes_up} bytes up, "
                  f"{s.bytes_down} bytes down, degraded: {s.degraded}[/dim]")
    return 1 if s.degraded else 0


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("url", help="the server's ws:// or wss:// URL")
    p.add_argument("--server-key", required=True, help="the server's public key or its SHA256: fingerprint, as tether serve prints them")
    p.add_argument("--prompt", default="Write a Python function that reverses a string.")
    args = p.parse_args(argv)
    return asyncio.run(run(args.url, args.server_key, args.edge_model, args.prompt, args.max_new_tokens))


if __name__ == "__main__":
    sys.exit(main())

"""Minions over a local file: the cloud plans, the edge reads; the file never leaves the device.

    python demos/minions_file.py [FILE] [--task "..."] [--edge-model DIR --cloud-model DIR]

The cloud model gets the task and chunk counts, writes jobs; the edge model runs them over
the file's chunks and sends back only its short findings (docs/minions.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import console, parser

from tether.edge import Client, MinionsFailed

SAMPLE = Path(__file__).with_name("sample_report.md")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", type=Path, default=SAMPLE, help="the private document (default: a sample)")
    p.add_argument("--task", default="How many units did the two teams sell in March together?")
    p.add_argument("--mode", default="minions", choices=["minions", "minion"])
    p.add_argument("--max-rounds", type=int, default=2)
    args = p.parse_args(argv)
    document = args.file.read_text(encoding="utf-8")

    with Client.local(args.edge_model, args.cloud_model) as client:
        try:
            result = client.ask(args.task, documents=[document], mode=args.mode, max_rounds=args.max_rounds)
            status = 0
        except MinionsFailed as exc:
            console.print(f"[yellow]the cloud's plan broke the schema ({exc}); partial transcript below[/yellow]")
            result, status = exc.partial, 2
    sent = result.sent_to_cloud()
    lines = [line for line in document.splitlines() if len(line) > 30]
    leaked = [line for line in lines if any(line in m for m in sent)]
    console.print(f"[bold]answer:[/bold] {result.answer}")
    console.print(f"[dim]{len(result.rounds)} round(s); {sum(map(len, sent))} characters sent to the cloud "
                  f"(the file has {len(document)}); whole lines of the file among them: {len(leaked)}; "
                  f"cloud tokens {result.cost.cloud_tokens} vs {result.cost.whole_document_tokens} to send "
                  f"the whole file[/dim]")
    return status


if __name__ == "__main__":
    sys.exit(main())

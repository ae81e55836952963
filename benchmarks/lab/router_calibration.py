"""Write the calibration scores shipped with `tether.routing` (``routing/calibration.json``).

What belongs here: turning the routing benchmark's cached edge probes of Tether's own task
bank (`benchmarks/lab/task_bank.py`, ``probes-train.npz``) into the score distributions of
the built-in routers, so that ``RoutingOptions(cloud_fraction=f)`` works with no
calibration step. What does not: running models (the probes are the benchmark's cache,
written by the real edge model) or choosing thresholds (`tether.routing._calibration`).

Scores per built-in router:
- query signals (``"draft_mean_logprob"``, ...): one score per task, from the edge's probe
  of the task's prompt (prefill + a 16-token greedy draft);
- token routers ``"confidence"`` / ``"margin"``: one score per draft position (the edge's
  top-token probability / top-1 minus top-2 at each of those tokens).

Regenerate after changing the default edge model (the probes are that model's)::

    tether bench routing              # refreshes benchmarks/results/routing_cache/probes-train.npz
    python -m benchmarks.lab.router_calibration
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "routing" / "calibration.json"
#: Quantiles kept per router (enough for a fraction resolution of 1/256; a small file).
QUANTILES = 257


def _quantiles(scores: list[float]) -> list[float]:
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size > QUANTILES:
        s = np.quantile(s, np.linspace(0.0, 1.0, QUANTILES))
    return [round(float(x), 6) for x in s]


def build(probes: dict[str, Any], *, edge_model: str) -> dict[str, Any]:
    """The calibration document from edge probes by task id (see the module docstring)."""
    from tether.routing._signals import SIGNALS

    if not probes:
        raise SystemExit("no probes: run `tether bench routing` first")
    query = {name: _quantiles([p.signal(name) for p in probes.values()]) for name in SIGNALS}
    confidence = [float(x) for p in probes.values() for x in p.draft.top_prob]
    margin = [float(x) for p in probes.values() for x in p.draft.margin]
    draft_tokens = max(len(p.draft_ids) for p in probes.values())
    return {
        "format": "tether-router-calibration",
        "version": 1,
        "edge_model": edge_model,
        "source": f"edge probes of the task bank ({len(probes)} tasks, {draft_tokens}-token greedy drafts)",
        "query_draft_tokens": draft_tokens,
        "query": query,
        "token": {"confidence": _quantiles(confidence), "margin": _quantiles(margin)},
        "counts": {"queries": len(probes), "token_positions": len(confidence)},
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.routing_data import load_probes
    from tether.models import DEFAULT_EDGE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="Where to write the JSON file.")
    args = parser.parse_args(argv)
    doc = build(load_probes("train"), edge_model=DEFAULT_EDGE_MODEL)
    args.out.write_text(json.dumps(doc, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({doc['source']})")


if __name__ == "__main__":
    main()

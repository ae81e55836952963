"""Query routing with a cloud budget: the edge answers what it can, the cloud gets at most a share.

    python demos/routing_budget.py [--budget 0.3] [--edge-model DIR --cloud-model DIR]

1. Score a few representative prompts with the edge's own confidence (a short greedy probe
   on the device; nothing is sent): ``route-query`` never routes to the cloud at threshold -inf.
2. Calibrate the router so that `budget` of that traffic goes to the cloud.
3. Answer new queries: each goes wholly to the edge or to the cloud (docs/routing.md).
"""

from __future__ import annotations

import sys

from _common import console, parser

from tether.edge import Client
from tether.routing import RoutingOptions, SignalRouter, calibrate_cloud_fraction

CALIBRATION = [
    "Write a Python function that returns the sum of a list.",
    "Write a function that reverses a string.",
    "Implement a thread-safe LRU cache with expiry in Python.",
    "Write a function that checks whether a string is a palindrome.",
    "Implement Dijkstra's shortest path algorithm with a binary heap.",
    "Write a function that returns the maximum of two numbers.",
    "Parse an arithmetic expression with operator precedence into an AST.",
    "Write a function that counts the vowels in a string.",
]
QUERIES = [
    "Write a function that returns the last element of a list.",
    "Implement a red-black tree insert with rebalancing.",
    "Write a function that doubles every number in a list.",
    "Write a regular-expression engine supporting *, + and ?.",
]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.3, help="share of queries allowed to go to the cloud")
    args = p.parse_args(argv)

    router = SignalRouter("draft_mean_logprob")
    with Client.local(args.edge_model, args.cloud_model) as client:
        probe_only = RoutingOptions(query_router=router, threshold=float("-inf"))
        scores = [client.generate(q, mode="route-query", max_new_tokens=1, routing=probe_only).stats.query_score
                  for q in CALIBRATION]
        threshold = calibrate_cloud_fraction(router, [s for s in scores if s is not None], args.budget)
        console.print(f"router {router.kind}: threshold {threshold:.3f} sends {args.budget:.0%} of the "
                      f"calibration prompts to the cloud")

        routed = RoutingOptions(query_router=router)  # the router's calibrated threshold
        to_cloud = 0
        for q in QUERIES:
            r = client.generate(q, mode="route-query", max_new_tokens=args.max_new_tokens, routing=routed)
            to_cloud += r.stats.route == "cloud"
            colour = "cyan" if r.stats.route == "cloud" else "yellow"
            console.print(f"[{colour}]{r.stats.route:>5}[/{colour}]  score {r.stats.query_score:7.3f}  {q}")
        console.print(f"[dim]{to_cloud}/{len(QUERIES)} queries went to the cloud (budget {args.budget:.0%})[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

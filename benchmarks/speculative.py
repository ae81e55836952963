"""Speculative drafting on the real pair: tokens/s and cloud cost vs emulated round-trip time.

Methods (same prompts, same run, greedy):
- ``cloud``: the cloud model generates every token (one streamed `Generate` request per answer).
- ``edge``: the edge model alone (no link; the same number at every RTT).
- ``speculative-k4``: edge drafts k=4, cloud verifies, no pipelining.
- ``speculative-adaptive``: cost-model draft length + pipelined drafting.
- ``hf-assisted``: transformers' `generate(assistant_model=...)`, both models in one process,
  no network (the reference; run once, shown at every RTT).

Measuring honestly on one shared CPU: edge and cloud each get their own thread budget
(`--edge-threads`, `--cloud-threads`, one each by default; transformers' assisted
generation runs both models on `--cloud-threads`). Besides wall-clock tokens/s the JSON
holds cloud forward passes and cloud compute seconds per committed token, which do not
depend on that sharing. The link is emulated at the session level (`EmulatedLink`): half
the RTT each way per request.

Run: ``python -m benchmarks.speculative`` (or ``tether bench speculative``); writes
``benchmarks/results/speculative.json``, ``docs/speculative_rtt.png`` and a section of
``docs/benchmarks.md``. Takes about 15 minutes with the defaults and ~11 GiB of memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain what a Python list comprehension is, with one short example.",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
)
RTTS_MS = (0, 20, 50, 100)
METHODS = ("cloud", "edge", "speculative-k4", "speculative-adaptive", "hf-assisted")
ROOT = Path(__file__).resolve().parent.parent
SECTION = "speculative"


@dataclass
class Tally:
    """Totals of one method at one RTT over all prompts."""

    tokens: int = 0
    wall_s: float = 0.0
    cloud_passes: int = 0
    cloud_compute_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    corrected: int = 0
    rounds: int = 0
    edge_passes: int = 0
    edge_compute_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    ttft_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, r: Any, speculative: bool) -> None:
        """Add one generation's result."""
        s = r.stats
        self.tokens += s.completion_tokens
        self.wall_s += s.wall_s
        self.cloud_passes += s.cloud_forward_passes
        self.cloud_compute_s += s.cloud_compute_s
        self.drafted += s.drafted_tokens
        self.accepted += s.accepted_tokens
        self.corrected += s.tokens_by_origin.get("cloud-corrected", 0)
        self.rounds += s.rounds if speculative else 0
        self.edge_passes += s.edge_forward_passes
        self.edge_compute_s += s.edge_compute_s
        self.bytes_up += s.bytes_up
        self.bytes_down += s.bytes_down
        self.ttft_s += s.ttft_s or 0.0
        self.outputs.append(list(r.token_ids))

    def row(self) -> dict[str, Any]:
        n = max(1, self.tokens)
        return {
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens / self.wall_s, 3) if self.wall_s else None,
            # After the first token of each answer (prompt prefill and first step left out).
            "decode_tokens_per_s": round((self.tokens - len(self.outputs)) / (self.wall_s - self.ttft_s), 3)
            if self.wall_s > self.ttft_s > 0 else None,
            "cloud_passes_per_token": round(self.cloud_passes / n, 3),
            "cloud_compute_s_per_token": round(self.cloud_compute_s / n, 4),
            "acceptance_rate": round(self.accepted / self.drafted, 3) if self.drafted else None,
            "mean_draft_length": round(self.drafted / self.rounds, 2) if self.rounds else None,
            # Geometric per-token acceptance (accepted / (accepted + rejections)); the cost model's alpha.
            "alpha": round(self.accepted / (self.accepted + self.corrected), 3) if self.drafted else None,
            "cloud_compute_s_per_pass": round(self.cloud_compute_s / self.cloud_passes, 4) if self.cloud_passes else None,
            "edge_s_per_pass": round(self.edge_compute_s / self.edge_passes, 4) if self.edge_passes else None,
            "bytes_up_per_token": round(self.bytes_up / n, 1),
            "bytes_down_per_token": round(self.bytes_down / n, 1),
        }


_SERVER_CODE = """
import asyncio, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from tether.cloud._config import CloudConfig
from tether.cloud._manager import SessionManager
from tether.cloud._server import CloudServer
from tether.protocol import KeyPair
from tether.runtime._loader import load_runtime

async def main():
    runtime, tokenizer = load_runtime(sys.argv[2], "torch", progress=False)
    manager = SessionManager(runtime, tokenizer=tokenizer, config=CloudConfig(batch_window_s=0.0))
    server = CloudServer(manager, keys=KeyPair.generate())
    await server.start()
    print("READY", server.url, server.keys.public.to_text(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class _CloudProcess:
    """`CloudServer` in its own process (own interpreter, own torch threads), on loopback."""

    def __init__(self, model: str, threads: int) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_CODE, str(threads), model],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY"):
                _, self.url, self.key = line.split()
                break
        else:
            raise RuntimeError("the cloud server process exited before it was ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def _client_runs(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, list[list[int]]]:
    import torch

    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import EdgeClient, EdgeModel, EmulatedLink, InProcessCloud, SpeculativeOptions
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
    from tether.runtime._loader import load_runtime

    from tether.protocol import LinkEmulator

    edge = EdgeModel.load(DEFAULT_EDGE_MODEL, backend=args.edge_backend, threads=args.edge_threads, progress=False)
    server: _CloudProcess | None = None
    manager: Any = None
    if args.cloud_process:
        server = _CloudProcess(DEFAULT_CLOUD_MODEL, args.cloud_threads)
    else:
        cloud_rt, tokenizer = load_runtime(DEFAULT_CLOUD_MODEL, "torch", progress=False)
        manager = SessionManager(cloud_rt, tokenizer=tokenizer, config=CloudConfig(batch_window_s=0.0))
        await manager.start()
        await manager.batcher.call(lambda: torch.set_num_threads(args.cloud_threads))

    async def make_client(rtt_ms: int) -> EdgeClient:
        if server is not None:
            link = LinkEmulator.symmetric(delay=rtt_ms / 2000) if rtt_ms else None
            return await EdgeClient.connect(server.url, server_key=server.key, edge_model=edge, link=link)
        return EdgeClient(edge, EmulatedLink.with_rtt(InProcessCloud(manager), rtt_ms / 1000))

    prompts = PROMPTS[: args.prompts]
    specs = {
        "cloud": ("cloud", None),
        "edge": ("edge", None),
        "speculative-k4": ("speculative", SpeculativeOptions(draft_length=4, pipeline=False)),
        "speculative-adaptive": ("speculative", SpeculativeOptions(draft_length="adaptive", pipeline=True)),
    }
    cloud_outputs: dict[str, list[list[int]]] = {}
    try:
        # Warm-up: first calls pay for allocation and onnxruntime's first-run costs.
        warm = await make_client(0)
        for mode in ("edge", "speculative", "cloud"):
            await warm.generate(prompts[0], mode=mode, max_new_tokens=4)
        await warm.aclose()
        for rtt_ms in args.rtts:
            methods = [m for m in args.methods if m in specs and (m != "edge" or rtt_ms == args.rtts[0])]
            # One client (connection, draft-length policy) per method; prompts interleave the
            # methods so that each sees the same load on the shared machine.
            clients = {m: await make_client(rtt_ms) for m in methods}
            tallies = {m: Tally() for m in methods}
            for prompt in prompts:
                for method in methods:
                    mode, opts = specs[method]
                    r = await clients[method].generate(prompt, mode=mode, max_new_tokens=args.max_new_tokens,
                                                       speculative=opts)
                    tallies[method].add(r, mode == "speculative")
            for client in clients.values():
                await client.aclose()
            for method in methods:
                tally, mode = tallies[method], specs[method][0]
                row = tally.row()
                if method == "cloud":
                    cloud_outputs[str(rtt_ms)] = tally.outputs
                elif mode == "speculative" and str(rtt_ms) in cloud_outputs:
                    row["identical_to_cloud"] = tally.outputs == cloud_outputs[str(rtt_ms)]
                results.setdefault(method, {})[str(rtt_ms)] = row
                print(f"rtt {rtt_ms:>3} ms  {method:<22} {row}", flush=True)
        if "edge" in results:
            for rtt_ms in args.rtts:
                results["edge"][str(rtt_ms)] = results["edge"][str(args.rtts[0])]
    finally:
        if manager is not None:
            await manager.aclose()
        if server is not None:
            server.close()
        edge.close()
    return cloud_outputs


def _hf_assisted(args: argparse.Namespace) -> tuple[dict[str, Any], list[list[int]]]:
    import torch

    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL, load_hf

    torch.set_num_threads(args.cloud_threads)
    target, tokenizer = load_hf(DEFAULT_CLOUD_MODEL, progress=False)
    draft, _ = load_hf(DEFAULT_EDGE_MODEL, progress=False)
    passes = [0]
    target.register_forward_pre_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    tally = Tally()
    prompts = PROMPTS[: args.prompts]
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            if i == 0:  # warm-up
                target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False)
            passes[0] = 0
            t0 = time.perf_counter()
            out = target.generate(ids, assistant_model=draft, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  attention_mask=torch.ones_like(ids))
            tally.wall_s += time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            eos = set(target.generation_config.eos_token_id if isinstance(target.generation_config.eos_token_id, list)
                      else [target.generation_config.eos_token_id])
            new = [t for t in new if t not in eos and t != tokenizer.pad_token_id]
            tally.tokens += len(new)
            tally.cloud_passes += passes[0] - 1  # the prefill pass is not counted for the others either
            tally.outputs.append(new)
    return tally.row(), tally.outputs


def _plot(results: dict[str, dict[str, Any]], rtts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"cloud": "o-", "edge": "s--", "speculative-k4": "^-", "speculative-adaptive": "D-", "hf-assisted": "x:"}
    for method, rows in results.items():
        ys = [rows.get(str(r), {}).get("tokens_per_s") for r in rtts]
        if all(y is not None for y in ys):
            ax.plot(rtts, ys, styles.get(method, "o-"), label=method)
    ax.set_xlabel("emulated round-trip time (ms)")
    ax.set_ylabel("committed tokens / s (log scale)")
    ax.set_yscale("log")
    ax.set_title("Qwen2.5-Coder 0.5B drafting for 1.5B, greedy (1 thread each side)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _markdown(report: dict[str, Any]) -> str:
    res, rtts, cond = report["results"], report["rtts_ms"], report["conditions"]
    lines = [
        "## Speculative drafting vs round-trip time",
        "",
        f"Command: `{cond['command']}`. Conditions: {cond['machine']}; greedy; {cond['prompts']} chat prompts, "
        f"{cond['max_new_tokens']} new tokens each; edge `{cond['edge_model']}` on `{cond['edge_backend']}` "
        f"({cond['edge_threads']} thread), cloud `{cond['cloud_model']}` on torch fp32 ({cond['cloud_threads']} thread), "
        f"cloud in its {cond['cloud_placement']}; both share the one 2-core CPU; half the RTT each way; "
        f"cloud s/token = {cond['cloud_compute']}; "
        "transformers' assisted generation runs both models in one process with no network "
        f"({cond['cloud_threads']} thread) and is shown at every RTT. "
        + (f"Order: {cond['order']}. " if cond.get("order") else "") + "One run; rough numbers.",
        "",
        "![tokens/s vs RTT](speculative_rtt.png)",
        "",
        "| method | " + " | ".join(f"{r} ms tok/s" for r in rtts) + " | cloud passes/token | cloud s/token (each RTT) | acceptance | bytes up/down per token |",
        "|---" * (len(rtts) + 5) + "|",
    ]
    for method, rows in res.items():
        cells = [f"{rows[str(r)]['tokens_per_s']:.2f}" if rows.get(str(r), {}).get("tokens_per_s") else "-" for r in rtts]
        first = rows[str(rtts[0])]
        acc = first.get("acceptance_rate")
        compute = " / ".join(f"{rows[str(r)]['cloud_compute_s_per_token']:.2f}" for r in rtts if str(r) in rows)
        lines.append(
            f"| {method} | " + " | ".join(cells)
            + f" | {first['cloud_passes_per_token']:.2f} | {compute} | "
            + (f"{acc:.0%}" if acc is not None else "-")
            + (f" | {first['bytes_up_per_token']:.0f} / {first['bytes_down_per_token']:.0f} |"
               if first.get("bytes_up_per_token") else " | - |")
        )
    lines += ["", "Targets (issue 6) and outcome:", ""]
    for t in report["targets"]:
        lines.append(f"- {t['target']}: measured {t['measured']} — {'met' if t['met'] else 'missed'}")
    ceil = {r: c for r, c in report.get("ceiling", {}).items() if c}
    if ceil:
        lines += ["", "Cost-model ceiling of adaptive+pipelined over fixed k=4 (non-pipelined), from this run's own "
                  "measurements (alpha from the k=4 rounds, edge s/token from edge mode, verify cost piecewise linear "
                  "through the cloud's reported compute per pass with 0 drafts (cloud mode), at k=4 and at the "
                  "adaptive policy's mean k; network = the emulated RTT):", ""]
        for r, c in ceil.items():
            curve = ", ".join(f"k={k}: {v:.2f} s" for k, v in c["verify_points"].items())
            lines.append(f"- {r} ms: alpha {c['alpha']:.2f}, edge {1000 * c['edge_s_per_token']:.0f} ms/token, verify "
                         f"per pass ({curve}): best k {c['best_k']}, at most **{c['ratio']:.2f}x** k=4")
    return "\n".join(lines)


def _ceiling(res: dict[str, dict[str, Any]], rtt_ms: int) -> dict[str, Any] | None:
    """What the cost model allows adaptive+pipelined over fixed k=4 with this run's measurements.

    Inputs measured in this run at this RTT: alpha from the k=4 rounds, the edge's seconds
    per draft token (edge mode), and the cloud's verify cost V as a piecewise-linear curve
    through its reported compute seconds per pass at 1 token (cloud mode), at k=4 and at the
    adaptive policy's mean k (extended past the last point with the last segment's slope);
    the network is the emulated RTT alone (protocol overhead left out). Returns the best k
    and the predicted tokens/s ratio of the best pipelined k over non-pipelined k=4.
    """
    from tether.edge.speculative._draft_length import expected_tokens, round_seconds

    rows = {m: res.get(m, {}).get(str(rtt_ms)) for m in ("speculative-k4", "speculative-adaptive", "cloud", "edge")}
    k4, cloud, edge = rows["speculative-k4"], rows["cloud"], rows["edge"]
    if not (k4 and cloud and edge) or None in (k4["alpha"], k4["cloud_compute_s_per_pass"],
                                              cloud["cloud_compute_s_per_pass"], edge["edge_s_per_pass"]):
        return None
    alpha, d, net = min(k4["alpha"], 0.999), edge["edge_s_per_pass"], rtt_ms / 1000
    points = {0.0: cloud["cloud_compute_s_per_pass"], k4["mean_draft_length"] or 4.0: k4["cloud_compute_s_per_pass"]}
    adaptive = rows["speculative-adaptive"]
    if adaptive and adaptive.get("mean_draft_length") and adaptive.get("cloud_compute_s_per_pass"):
        points[adaptive["mean_draft_length"]] = adaptive["cloud_compute_s_per_pass"]
    xs = sorted(points)

    def verify(k: int) -> float:  # piecewise linear in the drafts per pass
        i = next((i for i in range(1, len(xs)) if k <= xs[i]), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        slope = max(0.0, (points[x1] - points[x0]) / (x1 - x0))
        return points[x0] + slope * (k - x0) if k <= x1 else points[x1] + slope * (k - x1)

    def rate(k: int, pipelined: bool) -> float:
        return expected_tokens(alpha, k) / round_seconds(k, alpha=alpha, draft_s=d, network_s=net,
                                                         verify_s=verify(k), pipelined=pipelined)

    best = max(range(1, 17), key=lambda k: rate(k, True))
    return {"alpha": alpha, "edge_s_per_token": d, "verify_points": {f"{x:g}": points[x] for x in xs},
            "best_k": best, "ratio": round(rate(best, True) / rate(4, False), 3)}


def _targets(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def tps(method: str, rtt: int) -> float | None:
        row = res.get(method, {}).get(str(rtt))
        return None if row is None else row.get("tokens_per_s")

    def add(target: str, num: float | None, den: float | None, goal: float, better: str = ">=") -> None:
        if num is None or den is None or den == 0:
            return
        ratio = num / den
        met = ratio >= goal if better == ">=" else ratio <= goal
        out.append({"target": target, "measured": f"{ratio:.2f}x", "met": met})

    add("adaptive+pipelined >= 1.3x cloud tokens/s at 50 ms", tps("speculative-adaptive", 50), tps("cloud", 50), 1.3)
    add("adaptive+pipelined >= 1.2x fixed k=4 tokens/s at 50 ms", tps("speculative-adaptive", 50),
        tps("speculative-k4", 50), 1.2)
    a, c = res.get("speculative-adaptive", {}).get("50"), res.get("cloud", {}).get("50")
    if a and c:
        add("cloud passes per token <= 0.5 of cloud-only (50 ms)", a["cloud_passes_per_token"],
            c["cloud_passes_per_token"], 0.5, "<=")
    add("adaptive+pipelined >= 0.9x transformers assisted tokens/s at 0 ms", tps("speculative-adaptive", 0),
        tps("hf-assisted", 0), 0.9)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="tether bench speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rtts", type=int, nargs="+", default=list(RTTS_MS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--edge-backend", default="onnx-int4")
    parser.add_argument("--edge-threads", type=int, default=1)
    parser.add_argument("--cloud-threads", type=int, default=1)
    parser.add_argument("--in-process", dest="cloud_process", action="store_false",
                        help="run the cloud in this process (default: its own process, over the encrypted protocol)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)

    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    results: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    cloud_outputs = asyncio.run(_client_runs(args, results))
    if "hf-assisted" in args.methods:
        row, outputs = _hf_assisted(args)
        first = cloud_outputs.get(str(args.rtts[0]))
        if first is not None:
            row["identical_to_cloud"] = outputs == first
        results["hf-assisted"] = {str(r): row for r in args.rtts}
        print(f"hf-assisted {row}", flush=True)
    report = {
        "benchmark": "speculative",
        "rtts_ms": list(args.rtts),
        "conditions": {
            "command": "tether bench speculative " + " ".join(argv or []),
            "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores shared by edge and cloud",
            "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "edge_model": DEFAULT_EDGE_MODEL,
            "edge_backend": args.edge_backend,
            "edge_threads": args.edge_threads,
            "cloud_model": DEFAULT_CLOUD_MODEL,
            "cloud_threads": args.cloud_threads,
            "cloud_placement": ("own process, encrypted protocol on loopback, link emulated in the protocol adapter"
                                if args.cloud_process else "same process, link emulated per session request"),
            "cloud_compute": "compute seconds the cloud reports per forward pass (over the wire), prefill excluded",
            "order": "per RTT, prompts interleave the methods (one client each)",
            "decoding": "greedy",
            "seconds": round(time.time() - t0, 1),
        },
        "results": results,
    }
    report["targets"] = _targets(results)
    report["ceiling"] = {str(r): _ceiling(results, r) for r in args.rtts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_docs:
        _plot(results, list(args.rtts), args.docs / "speculative_rtt.png")
        from benchmarks._report import update_docs_section

        update_docs_section(SECTION, _markdown(report), path=args.docs / "benchmarks.md")
    for t in report["targets"]:
        print(("MET    " if t["met"] else "MISSED ") + f"{t['target']}: {t['measured']}")
    return report


def register(bench_app: Any) -> None:
    """Add `tether bench speculative` (options as for ``python -m benchmarks.speculative``)."""
    @bench_app.command(
        "speculative",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        help="Speculative drafting vs RTT on the real pair (see benchmarks/speculative.py; --help lists options).",
    )
    def _speculative(ctx: typer.Context) -> None:
        main(list(ctx.args))


if __name__ == "__main__":
    main()

"""`tether bench soak`: many edge sessions against one `tether serve`, then a hostile campaign.

What belongs here: the load and hostile-input runs of issue 11 as one command with one JSON
result and one docs/benchmarks.md section. The server is a real `tether serve` process on
loopback; the edge sessions are asyncio tasks in this process, each an `EdgeClient.connect`
with its own device key (all on the server's allowlist).

1. Load: `--sessions` sessions at once, `--rounds` rounds; each session runs `--requests`
   generations of `--tokens` tokens, the mode cycling over `--modes` (cloud, speculative,
   split). Every answer must be complete and equal to the cloud model's own greedy output
   (measured once per prompt, unloaded, before the rounds). Reported: errors, p50/p99
   latency per mode, the server's RSS after every round and the peak of its KV gauge
   against the configured budget (polled from /metrics).
2. Hostile: the malformed-request catalogue and a fuzz campaign of `--fuzz-frames` frames
   (`benchmarks/hostile.py`), then a normal generation must still be exact; the server's
   RSS before and after.

Default models are tiny random Qwen2s with the real Qwen2.5 tokenizer and vocabulary (the
edge a noisy copy of the cloud), so the run measures the service, not the model, and takes
a few minutes on 2 cores. `--real` serves the registry's cloud model and uses its edge model
(run it through `bigjob`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

TINY = "tiny-qwen2-realvocab"


# -- models -----------------------------------------------------------------------------------


def _tiny_pair(model_dir: Path, tokenizer: Any) -> tuple[Any, Any]:
    """A tiny cloud model (saved to `model_dir` with the tokenizer) and a noisy edge copy."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=1_000_000.0, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    cloud = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        cloud.lm_head.weight.mul_(20.0)  # decisive argmax: greedy paths are not decided by float noise
    cloud.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    edge = copy.deepcopy(cloud)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in edge.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.1)
    return cloud, edge.eval()


# -- the server process -------------------------------------------------------------------------


async def read_serve_banner(proc: asyncio.subprocess.Process, *, timeout: float) -> dict[str, str]:
    """What a starting `tether serve` prints about itself: ``url`` (ws://), ``fingerprint``
    and ``key`` of its public key, ``http`` (its HTTP port's URL). Each line may take up to
    `timeout` seconds; raises RuntimeError if the process exits first."""
    found: dict[str, str] = {}
    assert proc.stdout is not None
    while "http" not in found:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        if not line:
            raise RuntimeError("tether serve exited before printing its banner")
        if m := re.search(r"listening\s+(ws://\S+)", line):
            found["url"] = m.group(1)
        if m := re.search(r"server key (\S+)\s+\(clients pin this key: (\S+)\)", line):
            found["fingerprint"], found["key"] = m.group(1), m.group(2)
        if m := re.search(r"http\s+(http://\S+)", line):
            found["http"] = m.group(1)
    return found


class ServeProcess:
    """`tether serve` in a child process; its banner gives the URL, the key and the HTTP port."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, key: str, http: str) -> None:
        self.proc, self.url, self.key, self.http = proc, url, key, http

    @classmethod
    async def start(cls, model: str, keys_dir: Path, allow: Path, config: Path, threads: int) -> ServeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from tether.cli import main; main()", "serve", "--model", model,
            "--keys", str(keys_dir), "--port", "0", "--http-port", "0", "--allow-clients", str(allow),
            "--config", str(config), "--threads", str(threads), "--log-level", "error",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found = await read_serve_banner(proc, timeout=600.0)
        return cls(proc, found["url"], found["key"], found["http"])

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self) -> int:
        if self.alive:
            self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 60)
        if self.alive:
            self.proc.kill()
        return int(await self.proc.wait())


def histogram_quantiles(text: str, name: str, label: str, qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, Any]:
    """Per-label count and quantiles of a Prometheus histogram in exposition `text`, each
    quantile the upper bound of the bucket it falls in (what the histogram can say)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for m in re.finditer(rf'^{name}_bucket{{(.*?)}} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        buckets.setdefault(labels[label], []).append((le, float(m.group(2))))
    out: dict[str, Any] = {}
    for key, rows in sorted(buckets.items()):
        rows.sort()
        total = rows[-1][1]
        if not total:
            continue
        entry: dict[str, Any] = {"count": int(total)}
        for q in qs:
            bound = next(le for le, c in rows if c >= q * total)
            entry[f"p{round(q * 100)}_ms_at_most"] = None if bound == float("inf") else round(1000 * bound, 1)
        out[key] = entry
    return out


class MetricsPoller:
    """Samples the server's Prometheus gauges; keeps the peaks."""

    def __init__(self, http: str) -> None:
        self.http = http
        self.peak: dict[str, float] = {"tether_kv_bytes": 0.0, "tether_sessions_open": 0.0}
        self.last: dict[str, float] = {}
        self.text = ""
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> dict[str, float]:
        import httpx

        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"{self.http}/metrics")).text
        values = {}
        for name in self.peak:
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            if m:
                values[name] = float(m.group(1))
                self.peak[name] = max(self.peak[name], values[name])
        self.last = values
        self.text = text
        return values

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.sample()
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- load --------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _session(i: int, round_no: int, ctx: dict[str, Any], record: Any) -> None:
    from tether.edge import EdgeClient, SplitOptions

    args = ctx["args"]
    async with await EdgeClient.connect(ctx["url"], server_key=ctx["key"], edge_model=ctx["edge"],
                                        client_keys=ctx["keys"][i], split_model=ctx["split_model"],
                                        split=SplitOptions(split_layer=2, compression="fp32")) as client:
        for j in range(args.requests):
            mode = args.modes[(i + j + round_no) % len(args.modes)]
            p = (i * args.requests + j) % len(ctx["prompts"])
            t0 = time.perf_counter()
            try:
                r = await client.generate(ctx["prompts"][p], mode=mode, max_new_tokens=args.tokens)
            except Exception as exc:  # counted, never fatal: the run reports every failure
                record(mode, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            wall = time.perf_counter() - t0
            problem = None
            complete = r.finish_reason in ("length", "stop") and (
                r.finish_reason == "stop" or len(r.token_ids) == args.tokens)
            if not complete:
                problem = f"incomplete: finish_reason={r.finish_reason}, {len(r.token_ids)} tokens"
            elif r.stats.degraded:
                problem = "degraded (the cloud link failed; the answer is complete, finished on the edge)"
            elif list(r.token_ids) != ctx["refs"][p]:
                problem = "output differs from cloud-only greedy"
            record(mode, wall, error=problem, tokens=len(r.token_ids))


async def _references(ctx: dict[str, Any]) -> list[list[int]]:
    from tether.edge import EdgeClient

    refs = []
    async with await EdgeClient.connect(ctx["url"], server_key=ctx["key"], edge_model=ctx["edge"],
                                        client_keys=ctx["keys"][0]) as client:
        for prompt in ctx["prompts"]:
            r = await client.generate(prompt, mode="cloud", max_new_tokens=ctx["args"].tokens)
            refs.append(list(r.token_ids))
    return refs


async def _load(ctx: dict[str, Any], server: ServeProcess, poller: MetricsPoller, progress: Any) -> dict[str, Any]:
    args = ctx["args"]
    latencies: dict[str, list[float]] = {m: [] for m in args.modes}
    tokens: dict[str, int] = dict.fromkeys(args.modes, 0)
    errors: list[dict[str, Any]] = []
    rounds = []
    total = args.rounds * args.sessions * args.requests
    task = progress.add_task("load: generations", total=total)
    for round_no in range(args.rounds):
        t0 = time.perf_counter()

        def record(mode: str, wall: float, *, error: str | None, tokens_out: int = 0, r: int = round_no,
                   **kw: Any) -> None:
            if error is None:
                latencies[mode].append(wall)
                tokens[mode] += kw.get("tokens", 0)
            else:
                errors.append({"round": r, "mode": mode, "error": error})
            progress.advance(task)

        results = await asyncio.gather(*(_session(i, round_no, ctx, record) for i in range(args.sessions)),
                                       return_exceptions=True)
        for exc in results:
            if isinstance(exc, BaseException):
                errors.append({"round": round_no, "mode": "connect", "error": f"{type(exc).__name__}: {exc}"[:200]})
        wall = time.perf_counter() - t0
        for _ in range(100):  # every session closed with its client: the gauge returns to 0
            if (await poller.sample()).get("tether_sessions_open", 1) == 0:
                break
            await asyncio.sleep(0.1)
        rounds.append({"round": round_no, "seconds": round(wall, 2), "server_rss_mb": round(server.rss_mb(), 1),
                       "sessions_open_after": poller.last.get("tether_sessions_open"),
                       "kv_bytes_after": poller.last.get("tether_kv_bytes")})
    ops = histogram_quantiles(poller.text, "tether_request_seconds", "op")
    per_mode = {
        mode: {"generations": len(v), "tokens": tokens[mode],
               "p50_ms": round(1000 * _percentile(v, 50), 1), "p99_ms": round(1000 * _percentile(v, 99), 1),
               "mean_ms": round(1000 * statistics.fmean(v), 1) if v else None}
        for mode, v in latencies.items()
    }
    return {"rounds": rounds, "per_mode": per_mode, "server_per_op": ops, "errors": errors, "generations": total}


# -- hostile -----------------------------------------------------------------------------------


async def _hostile(ctx: dict[str, Any], server: ServeProcess, progress: Any) -> dict[str, Any]:
    from benchmarks.hostile import fuzz_campaign, run_malformed
    from tether.edge import EdgeClient
    from tether.protocol import load_public_key

    args = ctx["args"]
    key = load_public_key(ctx["key"])
    rss_before = server.rss_mb()
    cases = await run_malformed(ctx["url"], ctx["keys"][1], key, vocab=ctx["vocab"], hidden_size=ctx["hidden"],
                                max_tokens=ctx["max_tokens"], model=ctx["model_name"])
    # Repeated campaigns (different seeds) tell retained allocator memory, which levels off,
    # from a leak, which grows by the same amount every time.
    task = progress.add_task("fuzz: frames", total=args.fuzz_frames * args.fuzz_campaigns)
    t0 = time.perf_counter()
    rss_after_campaigns: list[float] = []
    unclean = 0
    for campaign in range(args.fuzz_campaigns):
        report = await fuzz_campaign(ctx["url"], ctx["keys"][2], key, frames=args.fuzz_frames, vocab=ctx["vocab"],
                                     model=ctx["model_name"], seed=args.seed + campaign,
                                     progress=lambda n: progress.advance(task, n))
        rss_after_campaigns.append(round(server.rss_mb(), 1))
        unclean += report.unclean
    fuzz_s = (time.perf_counter() - t0) / args.fuzz_campaigns
    async with await EdgeClient.connect(ctx["url"], server_key=ctx["key"], edge_model=ctx["edge"],
                                        client_keys=ctx["keys"][3]) as client:
        after = await client.generate(ctx["prompts"][0], mode="speculative", max_new_tokens=args.tokens)
    return {
        "malformed": [{"case": c.name, "outcome": c.outcome, "code": c.code, "message": c.message, "clean": c.clean}
                      for c in cases],
        "fuzz": {**report.as_dict(), "seconds": round(fuzz_s, 1), "unclean_closes": unclean,
                 "campaigns": args.fuzz_campaigns},
        "served_afterwards": list(after.token_ids) == ctx["refs"][0] and not after.stats.degraded,
        "server_alive": server.alive,
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_after": round(server.rss_mb(), 1),
        "server_rss_mb_after_each_campaign": rss_after_campaigns,
    }


# -- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks._report import environment
    from benchmarks.prompts import CHAT_PROMPTS
    from tether.edge import EdgeModel, SplitModel
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL, load_tokenizer
    from tether.protocol import KeyPair
    from tether.runtime import TorchCausalLM

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tether-soak-"))
    server_keys = KeyPair.generate()
    server_keys.save(work / "server")
    keys = [KeyPair.generate() for _ in range(max(args.sessions, 4))]
    (work / "clients.txt").write_text("".join(k.public.to_text() + "\n" for k in keys))
    if args.real:
        model_arg, model_name = DEFAULT_CLOUD_MODEL, DEFAULT_CLOUD_MODEL
        edge = await asyncio.to_thread(EdgeModel.load, DEFAULT_EDGE_MODEL, threads=args.threads)
        split_model = None
        args.modes = [m for m in args.modes if m != "split"]
        tokenizer = load_tokenizer(DEFAULT_CLOUD_MODEL, progress=False)
        from transformers import AutoConfig

        from tether.models import ensure_hf_dir

        hf = AutoConfig.from_pretrained(ensure_hf_dir(DEFAULT_CLOUD_MODEL, progress=False))
        vocab, hidden = int(hf.vocab_size), int(hf.hidden_size)
    else:
        tokenizer = load_tokenizer(DEFAULT_CLOUD_MODEL, progress=False)
        cloud_hf, edge_hf = _tiny_pair(work / TINY, tokenizer)
        model_arg, model_name = str(work / TINY), TINY
        edge = EdgeModel(TorchCausalLM(edge_hf, name="tiny-edge"), tokenizer)
        split_model = SplitModel(TorchCausalLM(cloud_hf, name=TINY)) if "split" in args.modes else None
        vocab, hidden = int(cloud_hf.config.vocab_size), int(cloud_hf.config.hidden_size)
    max_tokens = 1024
    (work / "cloud.toml").write_text(
        "[cloud]\n"
        f"max_sessions = {args.sessions + 16}\nmax_tokens = {max_tokens}\n"
        f"kv_budget_bytes = {args.kv_budget_mb * 1024 * 1024}\n"
        "max_connections_per_client = 16\nrequests_per_second = 1000.0\nburst = 2000\n"
    )
    server = await ServeProcess.start(model_arg, work / "server", work / "clients.txt", work / "cloud.toml",
                                      args.threads)
    poller = MetricsPoller(server.http)
    ctx: dict[str, Any] = {
        "args": args, "url": server.url, "key": server.key, "edge": edge, "keys": keys, "split_model": split_model,
        "prompts": list(CHAT_PROMPTS), "model_name": model_name, "vocab": vocab, "hidden": hidden,
        "max_tokens": max_tokens,
    }
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        rss_start = server.rss_mb()
        ctx["refs"] = await _references(ctx)
        poller.start()
        with Progress(*columns, disable=args.quiet) as progress:
            load = await _load(ctx, server, poller, progress)
            hostile = await _hostile(ctx, server, progress) if args.fuzz_frames else None
    finally:
        await poller.stop()
        exit_code = await server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the tiny model, keys and config
    rss = [r["server_rss_mb"] for r in load["rounds"]]
    budget = args.kv_budget_mb * 1024 * 1024
    targets = {
        "zero_errors": not load["errors"],
        "kv_within_budget": poller.peak["tether_kv_bytes"] <= budget,
        # Bounded memory: after the first round (allocator warm-up), growth across rounds < 5%.
        "rss_flat_after_first_round": len(rss) < 2 or (max(rss[1:]) - rss[1]) <= 0.05 * rss[1],
    }
    if hostile is not None:
        targets["fuzz_frames_reached"] = hostile["fuzz"]["frames"] >= args.fuzz_frames
        targets["fuzz_zero_unclean_closes"] = hostile["fuzz"]["unclean_closes"] == 0
        targets["malformed_all_clean"] = all(c["clean"] for c in hostile["malformed"])
        targets["served_after_hostile"] = hostile["served_afterwards"] and hostile["server_alive"]
    return {
        "environment": environment(),
        "config": {"sessions": args.sessions, "rounds": args.rounds, "requests_per_session": args.requests,
                   "tokens": args.tokens, "modes": args.modes, "model": model_name,
                   "edge": getattr(edge, "name", "tiny-edge") if args.real else "tiny-edge (noisy copy)",
                   "threads": args.threads, "kv_budget_bytes": budget, "fuzz_frames": args.fuzz_frames,
                   "seed": args.seed, "cpu_load_1min_at_start": os.getloadavg()[0]},
        "server_rss_mb_at_start": round(rss_start, 1),
        "load": load,
        "kv_peak_bytes": poller.peak["tether_kv_bytes"],
        "sessions_open_peak": poller.peak["tether_sessions_open"],
        "hostile": hostile,
        "server_exit_code": exit_code,
        "seconds": round(time.perf_counter() - started, 1),
        "targets": targets,
    }


def _markdown(result: dict[str, Any], command: str) -> str:
    cfg, load = result["config"], result["load"]
    lines = [
        "## Soak: concurrent sessions, hostile input, memory (`tether bench soak`)",
        "",
        f"{cfg['sessions']} concurrent edge sessions (asyncio tasks, one `EdgeClient.connect` and device key "
        f"each) against one `tether serve` process on loopback, {cfg['rounds']} rounds of "
        f"{cfg['requests_per_session']} generations x {cfg['tokens']} tokens per session, modes cycling over "
        f"{', '.join(cfg['modes'])}; model `{cfg['model']}`, {cfg['threads']} torch thread(s) per process, "
        f"KV budget {cfg['kv_budget_bytes'] / 2**20:.0f} MiB. Machine load at start: "
        f"{cfg['cpu_load_1min_at_start']:.1f}. Reproduce: `{command}`.",
        "",
        f"Errors: **{len(load['errors'])}** of {load['generations']} generations (an error is an exception, a "
        "degraded generation, an incomplete answer, or any token differing from the cloud model's own greedy "
        "output).",
        "",
        "| mode | generations | p50 latency (ms) | p99 latency (ms) |",
        "|---|---:|---:|---:|",
    ]
    for mode, m in load["per_mode"].items():
        lines.append(f"| {mode} | {m['generations']} | {m['p50_ms']} | {m['p99_ms']} |")
    if load.get("server_per_op"):
        lines += ["", "Server-side latency per request type (the `tether_request_seconds` histogram; each quantile "
                      "is the upper bound of its bucket):", "",
                  "| request | count | p50 (ms, at most) | p99 (ms, at most) |", "|---|---:|---:|---:|"]
        for op, m in load["server_per_op"].items():
            lines.append(f"| {op} | {m['count']} | {m['p50_ms_at_most']} | {m['p99_ms_at_most']} |")
    lines += [
        "",
        "| round | seconds | server RSS after (MiB) | sessions open after |",
        "|---:|---:|---:|---:|",
    ]
    for r in load["rounds"]:
        lines.append(f"| {r['round'] + 1} | {r['seconds']} | {r['server_rss_mb']} | {r['sessions_open_after']:.0f} |")
    lines += ["", f"Peak KV gauge {result['kv_peak_bytes'] / 2**20:.2f} MiB of the "
                  f"{cfg['kv_budget_bytes'] / 2**20:.0f} MiB budget; peak sessions open "
                  f"{result['sessions_open_peak']:.0f}; server RSS at start {result['server_rss_mb_at_start']} MiB."]
    hostile = result["hostile"]
    if hostile is not None:
        fuzz = hostile["fuzz"]
        lines += [
            "",
            f"Hostile input, same server: {fuzz['frames']} fuzzed frames ({fuzz['hostile_frames']} random, mutated or "
            f"hypothesis-drawn; the rest valid requests with random values) over {fuzz['connections']} connections "
            f"in {fuzz['seconds']} s: **{fuzz['unclean_closes']}** connections ended without a protocol close code; "
            f"close codes {fuzz['close_codes']}; replies {fuzz['replies']}. "
            f"{sum(c['clean'] for c in hostile['malformed'])}/{len(hostile['malformed'])} malformed requests "
            "answered cleanly (table in docs/reliability.md). Server alive and exact afterwards: "
            f"**{hostile['served_afterwards'] and hostile['server_alive']}**; server RSS "
            f"{hostile['server_rss_mb_before']} -> {hostile['server_rss_mb_after']} MiB.",
        ]
        campaigns = hostile.get("server_rss_mb_after_each_campaign", [])
        if len(campaigns) > 1:
            lines.append(
                f"The fuzz campaign ran {len(campaigns)} times (seeds differ; frames, close codes, replies and "
                f"seconds above are one campaign's, unclean closes all campaigns'); server RSS after each: {', '.join(f'{x:g}' for x in campaigns)} MiB."
            )
    met = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items())
    lines += ["", f"Targets: {met}. Total {result['seconds']} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # Imported here: tether.cli._bench imports this module to register the command.
    from benchmarks._report import repo_root, update_docs_section, write_results

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2, help="generations per session per round")
    parser.add_argument("--tokens", type=int, default=24, help="max_new_tokens of each generation")
    parser.add_argument("--modes", nargs="+", default=["cloud", "speculative", "split"],
                        choices=["cloud", "speculative", "split"])
    parser.add_argument("--fuzz-frames", type=int, default=10_000, help="0 skips the hostile phase")
    parser.add_argument("--fuzz-campaigns", type=int, default=1,
                        help="repeat the fuzz campaign, RSS after each (memory growth)")
    parser.add_argument("--kv-budget-mb", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="the registry's real pair (use bigjob)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, each process")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--docs", type=Path, default=repo_root() / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    name = "soak-real" if args.real else "soak"
    command = "tether bench soak " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command.strip()
    path = write_results(name, result) if args.out is None else args.out
    if args.out is not None:
        import json

        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if not args.no_docs:
        update_docs_section(name, _markdown(result, result["command"]), path=args.docs)
    print(_markdown(result, result["command"]))
    print(f"results: {path}")
    return result


def register(bench_app: Any) -> None:
    """Add `tether bench soak` (see `main` for the options)."""
    @bench_app.command(
        "soak", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help="32 edge sessions against one `tether serve` (mixed modes, exact answers, latency, memory), "
             "then malformed requests and a 10,000-frame fuzz campaign. Options (defaults): --sessions 32 "
             "--rounds 3 --requests 2 --tokens 24 --modes cloud speculative split --fuzz-frames 10000 "
             "--kv-budget-mb 64 --threads 1 --real --out FILE --no-docs --quiet.")
    def soak(ctx: typer.Context) -> None:
        main(list(ctx.args))


if __name__ == "__main__":
    main()

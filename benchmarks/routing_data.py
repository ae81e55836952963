"""The routing benchmark's data: model answers, probes and token pairs, cached on disk.

What belongs here: generating (once) and reading (always) everything the routing curves
need, with a resumable cache under ``benchmarks/results/routing_cache/``. What does not:
routers, curves and the report (`benchmarks/routing.py`).

Cache files (one JSON line per answer, written as soon as it is finished, so an
interrupted run resumes where it stopped):
- ``answers-{edge|cloud}-{train|humaneval}.jsonl``: greedy answer tokens and text per task,
  ``passed`` after the sandboxed tests ran;
- ``probes-{train|humaneval}.npz``: the edge probe of each prompt (signals, hidden states);
- ``embeddings-{train|humaneval}.npz``: all-MiniLM-L6-v2 embeddings of each query;
- ``token-runs-humaneval.jsonl``: route-token runs, one line per (router, threshold, task).
Token-agreement pairs (tens of MB of hidden states) go to ``cache_dir()/routing/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # importing tether.routing pulls in torch; keep `tether --help` light
    from benchmarks.lab.codeeval import CodeProblem

STOP_STRINGS: tuple[str, ...] = ("```", "\nif __name__", "\nprint(", "\nassert ")  # = benchmarks.lab.codeeval.STOP_STRINGS

CACHE = Path(__file__).resolve().parent / "results" / "routing_cache"
HUMANEVAL_STRIDE = 4
MAX_NEW_TOKENS = 160
PROBE_TOKENS = 16


def problems(split: str) -> list[CodeProblem]:
    """``"train"``: Tether's own tasks (`benchmarks/lab/task_bank.py`, 96); ``"humaneval"``: HumanEval/0, /4, ... /160 (41 problems)."""
    from benchmarks.lab.codeeval import humaneval_subset, training_tasks

    if split == "train":
        return training_tasks()
    if split == "humaneval":
        return humaneval_subset(HUMANEVAL_STRIDE)
    raise ValueError(f"unknown split {split!r}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def answers(role: str, split: str) -> dict[str, dict[str, Any]]:
    """Cached answers of one model on one split, by task id (last line wins)."""
    return {r["task_id"]: r for r in read_jsonl(CACHE / f"answers-{role}-{split}.jsonl")}


def stop_check(tokenizer: Any) -> Any:
    def done(ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-12:])
        return any(s in tail for s in STOP_STRINGS)

    return done


def generate(role: str, split: str, runtime: Any, tokenizer: Any, *, batch_size: int = 16,
             with_probes: bool = False, limit: int | None = None, deadline: float | None = None) -> None:
    """Greedy answers of `runtime` for every problem of `split` not yet cached."""
    from benchmarks.lab.collect import greedy_answers

    probs = problems(split)[:limit]
    done = answers(role, split)
    todo = [p for p in probs if p.task_id not in done]
    if not todo:
        return
    path = CACHE / f"answers-{role}-{split}.jsonl"
    probe_path = CACHE / f"probes-{split}.npz"
    probes = dict(np.load(probe_path)) if probe_path.exists() else {}
    prompts = [tokenizer.encode(p.chat_prompt(tokenizer), add_special_tokens=False) for p in todo]
    eos = [151645, 151643]
    t0 = time.perf_counter()

    def on_done(i: int, ans: Any) -> None:
        p = todo[i]
        text = tokenizer.decode(list(ans.token_ids), skip_special_tokens=True)
        res = p.check(text)
        append_jsonl(path, {"task_id": p.task_id, "token_ids": list(ans.token_ids), "completion": text,
                            "passed": res.passed, "prompt_tokens": len(prompts[i])})
        if with_probes:
            for k, v in ans.probe.to_arrays().items():
                probes[f"{p.task_id}|{k}"] = v
            np.savez(probe_path, **probes)
        print(f"[{role}/{split}] {p.task_id}: {len(ans.token_ids)} tokens, passed={res.passed} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)

    last: float | None = None
    for start in range(0, len(prompts), batch_size):
        # Start a batch only if it should end before the deadline (judged by the last one).
        if deadline is not None and time.time() + (1.2 * last if last else 60.0) > deadline:
            return
        t_batch = time.perf_counter()
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        greedy_answers(runtime, [prompts[i] for i in chunk], max_new_tokens=MAX_NEW_TOKENS, eos_ids=eos,
                       is_done=stop_check(tokenizer), batch_size=batch_size, probe_tokens=PROBE_TOKENS,
                       on_done=lambda j, ans, chunk=chunk: on_done(chunk[j], ans))
        last = time.perf_counter() - t_batch


def load_probes(split: str) -> dict[str, Any]:
    """Edge probes by task id, for the split's current problems only (the cache may still
    hold tasks since dropped from the bank, such as its HumanEval twins)."""
    from tether.routing._signals import EdgeProbe

    raw = dict(np.load(CACHE / f"probes-{split}.npz"))
    current = {p.task_id for p in problems(split)}
    by: dict[str, dict[str, Any]] = {}
    for key, arr in raw.items():
        tid, field = key.rsplit("|", 1)
        if tid in current:
            by.setdefault(tid, {})[field] = arr
    return {tid: EdgeProbe.from_arrays(a) for tid, a in by.items()}


def pairs_path() -> Path:
    from tether.paths import cache_dir

    return cache_dir() / "routing" / "agreement-pairs-train.npz"


def collect_pairs(edge: Any, cloud: Any, tokenizer: Any, *, edge_trajectories: bool = False) -> Path:
    """Token-agreement pairs on Tether's own tasks along the cloud's greedy answers.

    Along the cloud's own answer the cloud's argmax is the answer token, so only the edge
    runs (one forward per task). With `edge_trajectories` the edge's answers are added too
    (one more cloud forward per task: about 3x the cost on this CPU).
    """
    from benchmarks.lab.collect import agreement_pairs

    path = pairs_path()
    if path.exists():
        return path
    ea, ca = answers("edge", "train"), answers("cloud", "train")
    hs, ss, ys, src, traj = [], [], [], [], []
    for p in problems("train"):
        prompt = tokenizer.encode(p.chat_prompt(tokenizer), add_special_tokens=False)
        if edge_trajectories and p.task_id in ea and ea[p.task_id]["token_ids"]:
            ap = agreement_pairs(edge, cloud, prompt, ea[p.task_id]["token_ids"])
            hs.append(ap.hidden)
            ss.append(ap.signals)
            ys.append(ap.agree)
            src += [p.task_id] * len(ap.agree)
            traj += ["edge"] * len(ap.agree)
        if p.task_id in ca and ca[p.task_id]["token_ids"]:
            ap = agreement_pairs(edge, None, prompt, ca[p.task_id]["token_ids"], cloud_is_author=True)
            hs.append(ap.hidden)
            ss.append(ap.signals)
            ys.append(ap.agree)
            src += [p.task_id] * len(ap.agree)
            traj += ["cloud"] * len(ap.agree)
        print(f"[pairs] {p.task_id}: {sum(len(y) for y in ys)} positions so far", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, hidden=np.concatenate(hs).astype(np.float16), signals=np.concatenate(ss),
             agree=np.concatenate(ys), task=np.array(src), trajectory=np.array(traj))
    return path


DTYPE = "bfloat16"
"""Weights and compute of both models in this benchmark: bf16 GEMMs run ~4x faster than
fp32 on this CPU (avx512_bf16), which is what makes batched generation affordable here.
Every point of the curves (edge-only, cloud-only, routed) uses the same dtype."""


def load_model(name: str) -> tuple[Any, Any]:
    """A `TorchCausalLM` in `DTYPE` and its tokenizer."""
    import torch

    from tether.models import load_hf
    from tether.runtime import TorchCausalLM

    hf, tok = load_hf(name, dtype=getattr(torch, DTYPE), progress=False)
    return TorchCausalLM(hf, name=name), tok


def collect_all(edge: Any, cloud: Any, tok: Any, *, limit: int | None = None, batch_size: int = 12,
                deadline: float | None = None) -> bool:
    """Every answer and the token pairs still missing; True when all are cached."""
    # The edge is cheap: all its answers first; then the cloud's, HumanEval before training.
    for split in ("humaneval", "train"):
        generate("edge", split, edge, tok, with_probes=True, limit=limit, batch_size=2 * batch_size, deadline=deadline)
    for split in ("humaneval", "train"):
        generate("cloud", split, cloud, tok, limit=limit, batch_size=batch_size, deadline=deadline)
    complete = all(len(answers(r, s)) >= len(problems(s)[:limit]) for r in ("edge", "cloud") for s in ("humaneval", "train"))
    if complete and (deadline is None or time.time() < deadline):
        collect_pairs(edge, cloud, tok)
    return complete and pairs_path().exists()


def collect(stage: str, *, limit: int | None = None, batch_size: int = 16) -> None:
    """Run one generation stage with the real models (call under the big-memory lock).

    Stages: ``edge`` (edge answers + probes on both splits), ``cloud`` (cloud answers on
    both splits), ``pairs`` (token-agreement pairs; needs both).
    """
    import torch

    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
    # One thread: on a shared 2-core machine, two OpenMP threads spin against other
    # processes and run several times slower than one.
    torch.set_num_threads(int(os.environ.get("TETHER_THREADS", "1")))
    if stage == "all":  # everything still missing, in order of need, with both models loaded
        edge, tok = load_model(DEFAULT_EDGE_MODEL)
        cloud, _ = load_model(DEFAULT_CLOUD_MODEL)
        collect_all(edge, cloud, tok, limit=limit, batch_size=batch_size)
    elif stage == "edge":
        rt, tok = load_model(DEFAULT_EDGE_MODEL)
        for split in ("train", "humaneval"):
            generate("edge", split, rt, tok, with_probes=True, limit=limit, batch_size=batch_size)
    elif stage == "cloud":
        rt, tok = load_model(DEFAULT_CLOUD_MODEL)
        for split in ("humaneval", "train"):
            generate("cloud", split, rt, tok, limit=limit, batch_size=batch_size)
    elif stage == "pairs":
        edge, tok = load_model(DEFAULT_EDGE_MODEL)
        cloud, _ = load_model(DEFAULT_CLOUD_MODEL)
        collect_pairs(edge, cloud, tok)
    else:
        raise ValueError(f"unknown stage {stage!r}")


def queries(split: str) -> Sequence[CodeProblem]:
    return problems(split)


if __name__ == "__main__":
    import sys

    collect(sys.argv[1], limit=int(sys.argv[2]) if len(sys.argv) > 2 else None)

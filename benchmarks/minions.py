"""Minion and MinionS on the real pair: accuracy and cloud tokens on the generated long-document set.

Methods (same questions, greedy everywhere):
- ``edge-only``: the edge model (0.5B) reads the whole document and answers alone.
- ``cloud-only``: the whole document is sent to the cloud model (1.5B), which answers.
- ``minion``: the cloud model, which never sees the document, questions the edge model.
- ``minions``: the cloud model plans jobs, the edge runs them over chunks, the cloud synthesises.

Cloud tokens count prompt + completion tokens of every cloud chat call. The two baselines
run on a `BatchGenerator` over the model (the document is prefilled once and forked for
each question, which changes nothing about the tokens counted, only the hours spent). On
the 2-core CPU the 1.5B prefills ~30-80 tokens/s, so a 21k-token document costs many
minutes: every answer is cached under ``benchmarks/results/minions/<method>/<question>.json``
and each invocation can be limited to one method and one document, so the run is resumable.

Run: ``tether bench minions`` (or ``python -m benchmarks.minions``); ``--method`` and
``--doc`` restrict a run, ``--report-only`` only rebuilds the table, the plot
(``docs/minions_cost_accuracy.png``) and the ``minions`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import typer

from benchmarks.longdoc import LongDoc, generate, score

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "minions"
SECTION = "minions"
METHODS = ("edge-only", "cloud-only", "minion", "minions")
N_DOCS = 2
QUESTIONS_PER_DOC = 4
BASELINE_MAX_TOKENS = 128

BASELINE_SYSTEM = "You answer questions about a document. Use only figures stated in the document."
BASELINE_INSTRUCTION = (
    "First quote the figures you need from the document, then compute. "
    "End with a final line of the form 'Answer: <number>'."
)


def dataset(n_docs: int = N_DOCS, questions_per_doc: int = QUESTIONS_PER_DOC) -> list[LongDoc]:
    """The benchmark's documents (deterministic)."""
    return generate(n_docs, questions_per_doc=questions_per_doc)


def final_answer(text: str) -> str:
    """The text after the last ``Answer:`` (a baseline's final line), else all of it."""
    i = text.rfind("Answer:")
    return text[i + len("Answer:"):].strip() if i >= 0 else text.strip()


# -- the cache of answers ----------------------------------------------------------------------


def _fingerprint(method: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"method": method, **settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def fingerprints(max_rounds: int = 3) -> dict[str, str]:
    """The settings fingerprint of each method: a cached answer counts only under the same one."""
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    chunk = protocol_options().chunking.max_tokens
    return {
        "cloud-only": _fingerprint("cloud-only", {"model": DEFAULT_CLOUD_MODEL, "max_tokens": BASELINE_MAX_TOKENS,
                                                  "system": BASELINE_SYSTEM, "instruction": BASELINE_INSTRUCTION}),
        "edge-only": _fingerprint("edge-only", {"model": DEFAULT_EDGE_MODEL, "max_tokens": BASELINE_MAX_TOKENS,
                                                "instruction": BASELINE_INSTRUCTION, "prompt": "minion-edge"}),
        "minion": _fingerprint("minion", {"rounds": max_rounds, "format": ANSWER_FORMAT, "v": 2}),
        "minions": _fingerprint("minions", {"rounds": max_rounds, "format": ANSWER_FORMAT, "v": 5, "chunk": chunk}),
    }


def _cache_file(results: Path, method: str, qid: str) -> Path:
    return results / method / f"{qid}.json"


def load_cached(results: Path, method: str, qid: str, fingerprint: str) -> dict[str, Any] | None:
    """A cached answer for this method, question and settings, or None."""
    path = _cache_file(results, method, qid)
    if not path.exists():
        return None
    row: dict[str, Any] = json.loads(path.read_text())
    return row if row.get("fingerprint") == fingerprint else None


def store(results: Path, method: str, row: dict[str, Any]) -> None:
    path = _cache_file(results, method, row["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1) + "\n")


# -- baselines: one model reads the whole document ------------------------------------------


def _checkpoint_path(name: str, prefix: tuple[int, ...]) -> Path:
    from tether.paths import cache_dir

    digest = hashlib.sha256(json.dumps(prefix).encode()).hexdigest()[:12]
    return cache_dir() / "bench" / f"minions-{name}-{digest}.pt"


def _resumable_prefill(model: Any, gen: Any, prefix: tuple[int, ...], name: str, deadline: float | None) -> bool:
    """Prefill `prefix` into `gen`'s cache, resuming from (and saving to) a checkpoint on disk.

    A 21k-token document takes the 1.5B many minutes on this CPU, so the prefill is cut into
    steps that can each stop at `deadline` (a `time.monotonic()` value) and resume later.
    The KV tensors are read and restored through the torch backend state's append (appending
    nothing returns every held position): a benchmark-only reach into that backend, which has
    no serialisation API. Returns False when the deadline came first.
    """
    import torch

    path = _checkpoint_path(name, prefix)
    state = model.new_state()
    done, last = 0, None
    if path.exists():
        saved = torch.load(path, weights_only=True)
        with torch.inference_mode():
            for layer, (k, v) in enumerate(zip(saved["keys"], saved["values"], strict=True)):
                _kv_append(state)(layer, k, v)
        done, last = int(saved["n"]), saved["last"]
        print(f"  {name}: resumed at {done}/{len(prefix)} tokens", flush=True)
    t_save = time.monotonic()
    while done < len(prefix):
        if deadline is not None and time.monotonic() > deadline:
            break
        logits = model.extend(state, prefix[done:done + 512])
        done, last = min(len(prefix), done + 512), logits[-1].clone()
        if time.monotonic() - t_save > 120 or done == len(prefix):
            print(f"  {name}: {done}/{len(prefix)} tokens prefilled", flush=True)
        if time.monotonic() - t_save > 120:
            _save_checkpoint(model, state, done, last, path)
            t_save = time.monotonic()
    if done < len(prefix):
        if done:
            _save_checkpoint(model, state, done, last, path)
        model.release(state)
        return False
    assert last is not None
    gen.add_prefix(prefix, state, last)
    return True


def _kv_append(state: Any) -> Any:
    """The torch backend state's per-layer append (named ``_append`` or ``append`` by version)."""
    return getattr(state, "_append", None) or state.append


def _kv_shape(model_name: str) -> tuple[int, int]:
    """(kv heads, head dim) of a registry model, from its config."""
    from tether.models import ensure_hf_dir

    config = json.loads((Path(ensure_hf_dir(model_name)) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(config["num_key_value_heads"]), int(head_dim)


def _save_checkpoint(model: Any, state: Any, done: int, last: Any, path: Path) -> None:
    import torch

    heads, head_dim = _kv_shape(model.info.name)
    with torch.inference_mode():  # the cache tensors are inference tensors
        empty = torch.empty(heads, 0, head_dim, dtype=model.dtype)
        held = [_kv_append(state)(layer, empty, empty) for layer in range(model.info.num_layers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"n": done, "last": last, "keys": [k.clone(memory_format=torch.contiguous_format) for k, _ in held],
                            "values": [v.clone(memory_format=torch.contiguous_format) for _, v in held]},
               tmp)
    tmp.replace(path)


def save_edge_cache(model: Any, gen: Any, path: Path) -> None:
    """Write the generator's cached prefixes (documents, chunks) to disk, so a later run skips their prefill."""
    import torch

    heads, head_dim = _kv_shape(model.info.name)
    entries = []
    with torch.inference_mode():
        empty = torch.empty(heads, 0, head_dim, dtype=model.dtype)
        for ids, state, last in gen.prefixes():
            held = [_kv_append(state)(layer, empty, empty) for layer in range(model.info.num_layers)]
            entries.append({"ids": list(ids), "last": last, "keys": [k.clone() for k, _ in held],
                            "values": [v.clone() for _, v in held]})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(entries, tmp)
    tmp.replace(path)


def load_edge_cache(model: Any, gen: Any, path: Path) -> int:
    """Restore prefixes saved by `save_edge_cache`; returns how many."""
    import torch

    if not path.exists():
        return 0
    entries = torch.load(path, weights_only=True)
    with torch.inference_mode():
        for e in entries:
            state = model.new_state()
            for layer, (k, v) in enumerate(zip(e["keys"], e["values"], strict=True)):
                _kv_append(state)(layer, k, v)
            gen.add_prefix(e["ids"], state, e["last"])
    return len(entries)


def run_baseline(method: str, docs: list[LongDoc], results: Path, *, threads: int | None = None,
                 time_budget_s: float | None = None) -> None:
    """Edge-only or cloud-only answers for every question not cached yet.

    With `time_budget_s`, a long prefill stops when the budget is spent and resumes on the next run.
    """
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    import torch

    from tether.edge.minions._worker import BatchGenerator, EdgePrompt, encode_segments, render_segments
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
    from tether.runtime._loader import load_runtime

    model_name = DEFAULT_CLOUD_MODEL if method == "cloud-only" else DEFAULT_EDGE_MODEL
    fp = fingerprints()[method]
    todo = [(d, q) for d in docs for q in d.questions if load_cached(results, method, q.id, fp) is None]
    if not todo:
        print(f"{method}: all {sum(len(d.questions) for d in docs)} answers cached")
        return
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_runtime(model_name, "torch", progress=False)
    eos = list(model.info.eos_token_ids) + [int(tokenizer.eos_token_id)]
    gen = BatchGenerator(model, tokenizer, eos_ids=eos, max_batch=8, prefill_chunk=512, cache_tokens=40_000)
    for doc in docs:
        items = [q for d, q in todo if d.id == doc.id]
        if not items:
            continue
        prompts = []
        for q in items:
            segs = render_segments(tokenizer, [
                {"role": "system", "content": BASELINE_SYSTEM},
                {"role": "user", "content": [f"<document>\n{doc.text}</document>\n",
                                             f"Question: {q.question}\n{BASELINE_INSTRUCTION}"]},
            ])
            head = encode_segments(tokenizer, segs[:1])
            prompts.append(EdgePrompt(prefix=tuple(head), suffix=tuple(encode_segments(tokenizer, segs[1:])),
                                      max_new_tokens=BASELINE_MAX_TOKENS))
        t0 = time.perf_counter()
        prefix = prompts[0].prefix
        if not _resumable_prefill(model, gen, prefix, f"{method}-{doc.id}", deadline):
            print(f"{method} {doc.id}: time budget spent; rerun to resume the prefill", flush=True)
            return
        t_prefill = time.perf_counter() - t0
        print(f"{method} {doc.id}: prefilled {len(prefix)} tokens in {t_prefill:.0f} s", flush=True)
        outs = gen.generate(prompts)
        wall = time.perf_counter() - t0
        for q, p, o in zip(items, prompts, outs, strict=True):
            answer = final_answer(o.text)
            row = {
                "id": q.id, "fingerprint": fp, "method": method, "question": q.question, "expected": q.answer,
                "answer": answer, "reply": o.text, "correct": score(answer, q.answer),
                "cloud_prompt_tokens": o.prompt_tokens if method == "cloud-only" else 0,
                "cloud_completion_tokens": o.completion_tokens if method == "cloud-only" else 0,
                "edge_prompt_tokens": o.prompt_tokens if method == "edge-only" else 0,
                "edge_completion_tokens": o.completion_tokens if method == "edge-only" else 0,
                "whole_document_tokens": len(p.prefix) + len(p.suffix),
                "rounds": 0, "wall_s": round(wall / len(items), 1),
            }
            store(results, method, row)
            print(f"  {q.id}: expected {q.answer}, got {answer!r} -> {row['correct']}", flush=True)
        gen.clear()


# -- edge-only, Minion and MinionS: both models in this process --------------------------------

ANSWER_FORMAT = " Give the final answer as a single number."
MAX_ROUNDS = 3


def protocol_options() -> Any:
    from tether.edge import ChunkingOptions, MinionsOptions

    return MinionsOptions(chunking=ChunkingOptions(max_tokens=1024), edge_cache_tokens=64_000)


async def run_protocols(methods: list[str], docs: list[LongDoc], results: Path, *, max_rounds: int = MAX_ROUNDS,
                        threads: int | None = None) -> None:
    """Edge-only, Minion and MinionS answers for every question not cached yet (one process, both models)."""
    import torch

    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import EdgeClient, EdgeModel, InProcessCloud, MinionsFailed
    from tether.edge.minions._minion import edge_conversation
    from tether.edge.minions._minions import edge_generator
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
    from tether.runtime._loader import load_runtime

    opts = protocol_options()
    fps = fingerprints(max_rounds)
    todo = {m: [q for d in docs for q in d.questions if load_cached(results, m, q.id, fps[m]) is None]
            for m in methods}
    if not any(todo.values()):
        print(f"{', '.join(methods)}: all answers cached")
        return
    if threads:
        torch.set_num_threads(threads)
    edge = EdgeModel.load(DEFAULT_EDGE_MODEL, progress=False)
    manager = None
    if any(todo[m] for m in methods if m != "edge-only"):
        cloud_rt, cloud_tok = load_runtime(DEFAULT_CLOUD_MODEL, "torch", progress=False)
        manager = SessionManager(cloud_rt, tokenizer=cloud_tok, model_name=DEFAULT_CLOUD_MODEL,
                                 config=CloudConfig(batch_window_s=0.0, max_tokens=8192))
        await manager.start()
    client = EdgeClient(edge, InProcessCloud(manager) if manager is not None else None)
    gen = edge_generator(edge, opts)
    try:
        for doc in docs:
            cache_file = _checkpoint_path(f"edge-{doc.id}", tuple(edge.tokenizer.encode(doc.text[:2000])))
            restored = load_edge_cache(edge.runtime, gen, cache_file)
            if restored:
                print(f"{doc.id}: restored {restored} cached edge prefixes", flush=True)
            for method in methods:
                for q in [q for q in todo[method] if q.doc_id == doc.id]:
                    t0 = time.perf_counter()
                    row: dict[str, Any] = {"id": q.id, "fingerprint": fps[method], "method": method,
                                           "question": q.question, "expected": q.answer}
                    if method == "edge-only":
                        prompt = edge_conversation(edge.tokenizer, [doc.text], [],
                                                   f"{q.question}\n{BASELINE_INSTRUCTION}",
                                                   max_new_tokens=BASELINE_MAX_TOKENS)
                        out = (await edge.run(gen.generate, [prompt]))[0]
                        answer = final_answer(out.text)
                        row |= {"answer": answer, "reply": out.text, "cloud_prompt_tokens": 0,
                                "cloud_completion_tokens": 0, "edge_prompt_tokens": out.prompt_tokens,
                                "edge_completion_tokens": out.completion_tokens,
                                "whole_document_tokens": out.prompt_tokens, "rounds": 0}
                    else:
                        try:
                            res = await client.ask(q.question + ANSWER_FORMAT, documents=[doc.text], mode=method,
                                                   max_rounds=max_rounds, options=opts)
                            failure = None
                        except MinionsFailed as exc:
                            res, failure = exc.partial, str(exc)
                        answer = res.answer or ""
                        c = res.cost
                        row |= {"answer": answer, "failure": failure, "forced": res.forced,
                                "cloud_prompt_tokens": c.cloud_prompt_tokens,
                                "cloud_completion_tokens": c.cloud_completion_tokens,
                                "edge_prompt_tokens": c.edge_prompt_tokens,
                                "edge_completion_tokens": c.edge_completion_tokens,
                                "whole_document_tokens": c.whole_document_tokens,
                                "rounds": sum(1 for r in res.rounds if r.edge_runs), "transcript": res.to_dict()}
                    row["correct"] = score(answer, q.answer)
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    store(results, method, row)
                    save_edge_cache(edge.runtime, gen, cache_file)
                    print(f"{method} {q.id}: expected {q.answer}, got {answer!r} -> {row['correct']} "
                          f"(cloud tokens {row['cloud_prompt_tokens'] + row['cloud_completion_tokens']}, "
                          f"{row['wall_s']} s)", flush=True)
    finally:
        await client.aclose()
        if manager is not None:
            await manager.aclose()
        edge.close()


# -- summary, plot, docs --------------------------------------------------------------------------

TARGETS = {"minions": (5.0, 0.90), "minion": (20.0, None)}


def collect(results: Path, docs: list[LongDoc], max_rounds: int = 3) -> dict[str, list[dict[str, Any]]]:
    """The cached rows of every method under the current settings, in question order (missing ones skipped)."""
    fps = fingerprints(max_rounds)
    rows: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        for d in docs:
            for q in d.questions:
                row = load_cached(results, method, q.id, fps[method])
                if row is not None:
                    row["correct"] = score(row.get("answer"), q.answer)  # always the current scorer
                    rows.setdefault(method, []).append(row)
    return rows


def _cloud_tokens(row: dict[str, Any]) -> int:
    return int(row["cloud_prompt_tokens"] + row["cloud_completion_tokens"])


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy and mean tokens per method, and each method against cloud-only."""
    table: dict[str, dict[str, Any]] = {}
    for method, rs in rows.items():
        n = len(rs)
        cloud = [r["cloud_prompt_tokens"] + r["cloud_completion_tokens"] for r in rs]
        table[method] = {
            "questions": n,
            "correct": sum(bool(r["correct"]) for r in rs),
            "accuracy": round(sum(bool(r["correct"]) for r in rs) / n, 3) if n else None,
            "cloud_tokens_mean": round(sum(cloud) / n, 1) if n else None,
            "cloud_prompt_tokens_mean": round(sum(r["cloud_prompt_tokens"] for r in rs) / n, 1) if n else None,
            "edge_tokens_mean": round(sum(r["edge_prompt_tokens"] + r["edge_completion_tokens"] for r in rs) / n, 1)
            if n else None,
            "whole_document_tokens_mean": round(sum(r["whole_document_tokens"] for r in rs) / n, 1) if n else None,
            "rounds_mean": round(sum(r.get("rounds", 0) for r in rs) / n, 2) if n else None,
            "failures": sum(1 for r in rs if r.get("failure")),
            "wall_s_mean": round(sum(r.get("wall_s", 0.0) for r in rs) / n, 1) if n else None,
        }
    base_rows = {r["id"]: r for r in rows.get("cloud-only", [])}
    for method, row in table.items():
        # Each method against cloud-only on the questions both answered (a partial run is
        # compared on its own questions only).
        rs = rows[method]
        shared = [r for r in rs if r["id"] in base_rows]
        row["shared_with_cloud_only"] = len(shared)
        if not row["cloud_tokens_mean"]:
            continue
        if shared:
            ref = sum(_cloud_tokens(base_rows[r["id"]]) for r in shared)
            row["cloud_token_reduction_vs_cloud_only"] = round(ref / max(1, sum(_cloud_tokens(r) for r in shared)), 1)
            base_correct = sum(bool(base_rows[r["id"]]["correct"]) for r in shared)
            if base_correct:
                row["accuracy_vs_cloud_only"] = round(sum(bool(r["correct"]) for r in shared) / base_correct, 3)
        else:
            # No cloud-only answer to compare with: against the whole-document prompt the
            # protocol counted (no completion).
            row["cloud_token_reduction_vs_cloud_only"] = round(
                row["whole_document_tokens_mean"] / row["cloud_tokens_mean"], 1)
    targets = []
    for method, (reduction, acc) in TARGETS.items():
        row = table.get(method)
        if row is None:
            continue
        got_red = row.get("cloud_token_reduction_vs_cloud_only")
        got_acc = row.get("accuracy_vs_cloud_only")
        red_ok = got_red is not None and got_red >= reduction
        if acc is None:
            met: bool | None = red_ok
        elif got_acc is None:
            met = None if red_ok else False  # accuracy vs cloud-only unknown without the baseline
        else:
            met = red_ok and got_acc >= acc
        want = f">= {reduction:g}x fewer cloud tokens than cloud-only" + (
            f" at >= {acc:.0%} of its accuracy" if acc else "")
        shared = row["shared_with_cloud_only"]
        measured = f"{got_red}x fewer cloud tokens" + (
            f" on the {shared} questions cloud-only answered too" if shared else " (vs the whole-document prompt)")
        if acc:
            if got_acc is not None:
                measured += f", {got_acc:.0%} of cloud-only accuracy"
            elif shared:
                measured += ", and cloud-only answered none of them right: no accuracy ratio"
            else:
                measured += ", cloud-only accuracy not measured"
        targets.append({"method": method, "target": want, "met": met, "measured": measured})
    return {"methods": table, "targets": targets}


def plot(summary: dict[str, Any], path: Path, probe_rows: list[dict[str, Any]] | None = None,
         whole_document_tokens: float | None = None) -> None:
    """Cost-accuracy scatter: mean cloud tokens per question (log x) against accuracy.

    Probe answers (earlier prompt versions) are drawn hollow; a dashed line marks what
    sending the whole document costs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, row in summary["methods"].items():
        x = max(1.0, row["cloud_tokens_mean"] or 1.0)
        ax.scatter([x], [row["accuracy"]], s=60)
        ax.annotate(f"{method}\n{row['correct']}/{row['questions']}", (x, row["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in probe_rows or []:
        groups.setdefault(f"{r['method']} ({r['version']} probe)", []).append(r)
    for label, rs in groups.items():
        x = sum(r["cloud_tokens"] for r in rs) / len(rs)
        y = sum(bool(r["correct"]) for r in rs) / len(rs)
        ax.scatter([x], [y], s=60, facecolors="none", edgecolors="gray")
        ax.annotate(f"{label}\n{sum(bool(r['correct']) for r in rs)}/{len(rs)}", (x, y), textcoords="offset points",
                    xytext=(6, -14), fontsize=7, color="gray")
    if whole_document_tokens:
        ax.axvline(whole_document_tokens, linestyle="--", color="gray", linewidth=1)
        ax.annotate("whole document sent", (whole_document_tokens, 0.5), rotation=90, fontsize=7, color="gray",
                    textcoords="offset points", xytext=(-10, 0))
    ax.set_xscale("log")
    ax.set_xlabel("cloud tokens per question (prompt + completion, log scale; edge-only = 1)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Long-document QA: cost vs accuracy (edge 0.5B, cloud 1.5B)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "## Minions: cloud tokens vs accuracy on long private documents",
        "",
        f"`tether bench minions` on the generated long-document set (`benchmarks/longdoc.py`): "
        f"{report['documents']} synthetic annual reports of {report['document_tokens']} tokens each, "
        f"{report['questions']} questions that combine figures from two or three sections with a sum or a "
        "difference; an answer counts when its number (after its last `=`, else its first) is the expected "
        "integer. Edge model "
        f"{report['edge_model']}, cloud model {report['cloud_model']}, greedy, max_rounds={report['max_rounds']}, "
        f"MinionS chunks of {report['chunk_tokens']} tokens. {report['machine']}.",
        "",
    ]
    if not s["methods"]:
        lines.append("No answers under the current prompt version yet (see the status note below).")
    else:
        lines += ["| method | accuracy | cloud tokens / question | fewer cloud tokens than cloud-only | "
                  "edge tokens / question | rounds | protocol failures |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        row = s["methods"].get(method)
        if row is None:
            continue
        red = row.get("cloud_token_reduction_vs_cloud_only")
        lines.append(
            f"| {method} | {row['correct']}/{row['questions']} ({row['accuracy']:.0%}) | "
            f"{row['cloud_tokens_mean']:,.0f} | {'-' if red is None or method == 'cloud-only' else f'{red}x'} | "
            f"{row['edge_tokens_mean']:,.0f} | {row['rounds_mean']} | {row['failures']} |"
        )
    lines += ["", "![cost vs accuracy](minions_cost_accuracy.png)", ""]
    if s["targets"]:
        lines += ["Targets:", ""]
    for t in s["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "OPEN"}[t["met"]]
        lines.append(f"- {verdict}: {t['method']} {t['target']} (measured: {t['measured']})")
    if report.get("probes"):
        lines += ["", "Probe answers from earlier prompt versions (kept in `benchmarks/results/minions/probes/`, "
                  "full transcripts inside):", "",
                  "| method | version | question | expected | answer | cloud tokens | whole document | fewer | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["probes"]:
            answer = (r["answer"] or f"(failed: {(r['failure'] or '')[:60]})").replace("|", "/")
            lines.append(f"| {r['method']} | {r['version']} | {r['id']} | {r['expected']} | {answer} | "
                         f"{r['cloud_tokens']:,} | {r['whole_document_tokens']:,} | {r['reduction']}x | {r['wall_s']} |")
    if report.get("notes"):
        lines += ["", report["notes"]]
    lines += ["", "Reproduce: `tether bench minions` (resumable: answers are cached under "
              "`benchmarks/results/minions/`; `--method`, `--doc`, `--questions` restrict a run, "
              "`--report-only` rebuilds this section)."]
    return "\n".join(lines)


NOTES_FILE = RESULTS / "NOTES.md"
PROBES = RESULTS / "probes"


def probes(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Answers kept from runs of earlier prompt versions (``probes/<method>-<version>-<question>.json``)."""
    out = []
    for path in sorted((results / "probes").glob("*.json")):
        r = json.loads(path.read_text())
        method, version = path.stem.split("-")[:2]
        cloud = r["cloud_prompt_tokens"] + r["cloud_completion_tokens"]
        out.append({"method": method, "version": version, "id": r["id"], "expected": r["expected"],
                    "answer": (r.get("answer") or "")[:80], "correct": r["correct"], "cloud_tokens": cloud,
                    "whole_document_tokens": r["whole_document_tokens"], "failure": r.get("failure"),
                    "reduction": round(r["whole_document_tokens"] / cloud, 1) if cloud else None,
                    "wall_s": r.get("wall_s")})
    return out


def report(docs: list[LongDoc], results: Path = RESULTS, *, write_docs: bool = True, max_rounds: int = MAX_ROUNDS
           ) -> dict[str, Any]:
    """Summarise the cached answers; write the JSON, the plot and the docs section."""
    from tether.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    rows = collect(results, docs, max_rounds)
    summary = summarise(rows)
    doc_tokens = sorted({r["whole_document_tokens"] for r in rows.get("cloud-only", [])})
    data = {
        "summary": summary,
        "documents": len(docs),
        "questions": sum(len(d.questions) for d in docs),
        "document_tokens": (f"{min(doc_tokens):,}-{max(doc_tokens):,}" if doc_tokens else "~21k"),
        "edge_model": DEFAULT_EDGE_MODEL,
        "cloud_model": DEFAULT_CLOUD_MODEL,
        "max_rounds": max_rounds,
        "chunk_tokens": protocol_options().chunking.max_tokens,
        "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores (shared), torch fp32",
        "notes": NOTES_FILE.read_text().strip() if NOTES_FILE.exists() else "",
        "probes": probes(results),
    }
    if write_docs:
        from benchmarks._report import repo_root, update_docs_section, write_results

        write_results("minions", data)
        whole = [r["whole_document_tokens"] for rs in rows.values() for r in rs] + [
            r["whole_document_tokens"] for r in data["probes"]]
        if summary["methods"] or data["probes"]:
            plot(summary, repo_root() / "docs" / "minions_cost_accuracy.png", data["probes"],
                 sum(whole) / len(whole) if whole else None)
        update_docs_section("minions", markdown(data))
    return data


def run(methods: list[str], docs: list[LongDoc], results: Path = RESULTS, *, max_rounds: int = MAX_ROUNDS,
        threads: int | None = None, time_budget_s: float | None = None) -> None:
    """Answer every question not cached yet with each method (cloud-only in its own pass)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "cloud-only" in methods:
        run_baseline("cloud-only", docs, results, threads=threads, time_budget_s=time_budget_s)
    rest = [m for m in METHODS if m in methods and m != "cloud-only"]
    if rest:
        asyncio.run(run_protocols(rest, docs, results, max_rounds=max_rounds, threads=threads))


def select(doc_ids: list[str] | None, questions: int | None) -> list[LongDoc]:
    docs = dataset()
    if doc_ids:
        docs = [d for d in docs if d.id in doc_ids]
    if questions is not None:
        docs = [LongDoc(id=d.id, title=d.title, text=d.text, questions=d.questions[:questions]) for d in docs]
    return docs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", choices=METHODS, help="run only these (repeatable)")
    parser.add_argument("--doc", action="append", help="run only these documents (report1, report2)")
    parser.add_argument("--questions", type=int, help="only the first N questions of each document")
    parser.add_argument("--max-rounds", type=int, default=MAX_ROUNDS)
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--time-budget", type=float, help="seconds the cloud-only prefill may take before it "
                        "saves a checkpoint and stops (rerun to resume)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the summary, plot and docs")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/ or benchmarks/results/minions.json")
    args = parser.parse_args(argv)
    if not args.report_only:
        run(args.method or list(METHODS), select(args.doc, args.questions), max_rounds=args.max_rounds,
            threads=args.threads, time_budget_s=args.time_budget)
    data = report(dataset(), write_docs=not args.no_docs, max_rounds=args.max_rounds)
    print(markdown(data))
    return data


def register(bench_app: Any) -> None:
    """Add `tether bench minions`."""

    @bench_app.command("minions", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def minions_command(ctx: typer.Context) -> None:
        """Minion / MinionS vs edge-only and cloud-only: accuracy and cloud tokens on long documents.

        Options: --method M (repeatable), --doc ID, --questions N, --max-rounds R, --threads T,
        --report-only, --no-docs. Long: the cloud-only baseline prefills ~21k tokens per document on
        the 1.5B; answers are cached, so an interrupted run resumes.
        """
        main(list(ctx.args))


if __name__ == "__main__":
    main()

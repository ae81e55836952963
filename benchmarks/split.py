"""Split computing on the real cloud model: bytes, agreement, tokens/s, early exit.

Which model: Qwen2.5-Coder-1.5B-Instruct, the *cloud* model, split in two — the same weights
on both sides of the link, which is what split mode is (the 0.5B edge model is a different
model and cannot continue the 1.5B's hidden states). Split points k = 7, 14, 21 and 24 of its
28 layers (a quarter, half, three quarters and six sevenths on the device).

Stages (each resumable: results are cached per prompt / per configuration in
``benchmarks/results/split_cache/``, and each stage stops after ``--budget-s`` seconds so it
fits the shared machine's memory lock; run again to continue):

- ``reference``: the unsplit model's greedy output (32 tokens) for 20 coding prompts.
- ``train``: exit heads for k = 14, 21 and 24 (what `tether split train-exit` does: the
  model's own answers to 68 built-in chat prompts + HumanEval solutions as chat; none of
  the benchmark prompts).
- ``agreement``: teacher-forced along each reference output, for every k and compression,
  the split model's top-1 at each output position (the cloud half runs on the decoded
  hidden states, exactly what it receives on the wire); and at each position the early
  exits' token and confidence (the model's own head at layer k, and the trained head).
- ``speed``: end-to-end `EdgeClient(mode="split")` generations over an emulated link at 20
  and 50 ms RTT with a 10 Mbit/s uplink (both halves share this machine's CPU; the cloud
  is in-process): tokens/s, bytes up per token, cloud mode as the reference.
- ``report``: ``benchmarks/results/split.json``, ``docs/split_bench.png``, and the ``split``
  section of docs/benchmarks.md.

Run: ``python -m benchmarks.split --stage all`` (or ``tether bench split``), each
stage alone on a machine whose memory is shared (~7.5 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import typer

from benchmarks.prompts import CHAT_PROMPTS
from tether.protocol import COMPRESSIONS  # every compression of the one vocabulary is measured

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / "split_cache"
SECTION = "split"
K_LIST = (7, 14, 21, 24)
EXIT_LAYERS = (21, 24)  # k=14's head answered 7% at 98% in the first run: not worth the device's time
LOSSLESS_OVER = {"int8-deflate": "int8"}  # same decoded values: the cloud half is not run twice
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
RTTS_MS = (20, 50)
UPLINK_BPS = 10e6
NEW_TOKENS = 32
SPEED_TOKENS = 24
SPEED_PROMPTS = 2
FRAMING_BYTES = 56  # what the session-level link emulator adds per request (header + a few fields)

PROMPTS = CHAT_PROMPTS[:20]  # 20 prompts x 32 tokens: the minimum, sized to the shared machine's lock


# -- helpers ------------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    path = CACHE / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _save(name: str, data: dict[str, Any]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{name}.json.tmp"
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(CACHE / f"{name}.json")


def _model_name() -> str:
    from tether.models import DEFAULT_CLOUD_MODEL

    return DEFAULT_CLOUD_MODEL


_LOADED: list[tuple[Any, Any]] = []


def _model() -> tuple[Any, Any]:
    """(runtime, tokenizer) of the model under test, loaded once per process (tests swap in a tiny one)."""
    from tether.runtime._loader import load_runtime

    if not _LOADED:
        _LOADED.append(load_runtime(_model_name(), "torch", progress=False))
    return _LOADED[0]


def _tokenizer() -> Any:
    from tether.models import load_tokenizer

    return load_tokenizer(_model_name(), progress=False)


def _head_path(k: int) -> Path:
    """Exit heads live in the user cache (50 MB each), not in the repository."""
    from tether.cli._split import default_head_path

    return default_head_path(_model_name(), k)


def _prompt_keys(ref: dict[str, Any]) -> list[str]:
    return sorted((k for k in ref if k.isdigit()), key=int)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    @property
    def spent(self) -> bool:
        return time.monotonic() > self.end


# -- stages -------------------------------------------------------------------------------------


def stage_reference(budget: Budget) -> bool:
    """The unsplit model's greedy tokens per prompt; True when every prompt is done."""
    import torch

    from tether.edge._text import build_prompt
    from tether.runtime import greedy_generate

    ref = _load("reference")
    todo = [i for i in range(len(PROMPTS)) if str(i) not in ref]
    if not todo and "model" in ref:
        return True
    rt, tok = _model()
    ref["model"] = {"hidden_size": rt.info.hidden_size, "num_layers": rt.info.num_layers}
    eos = set(rt.info.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    for i in todo:
        if budget.spent:
            return False
        ids = build_prompt(tok, PROMPTS[i], chat_template=None, system=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            (d,) = greedy_generate(rt, [ids], max_new_tokens=NEW_TOKENS, stop_ids=eos)
        out = list(d.token_ids) + ([d.stop_id] if d.stop_id is not None else [])  # the reference keeps its eos
        ref[str(i)] = {"prompt": PROMPTS[i], "prompt_ids": ids, "output_ids": out,
                       "seconds": round(time.perf_counter() - t0, 2)}
        _save("reference", ref)
        print(f"reference {i + 1}/{len(PROMPTS)}: {len(out)} tokens, {ref[str(i)]['seconds']}s", flush=True)
    return True


def stage_train(budget: Budget, max_tokens: int = 10_000, epochs: int = 3, min_train_s: float = 120.0) -> bool:
    """Exit heads for EXIT_LAYERS with the CLI's training function; True when both exist."""
    if all(_head_path(k).is_file() for k in EXIT_LAYERS):
        return True
    from benchmarks.lab.exit_corpus import TRAINING_PROMPTS, default_corpus
    from tether.paths import cache_dir
    from tether.cli._split import ModelOnDemand, self_distilled, train_exit_heads

    full = ModelOnDemand(_model_name(), _model()[0])
    own = self_distilled(full, _tokenizer(), cache=cache_dir() / "exit_data", prompts=TRAINING_PROMPTS,
                         budget_s=max(1.0, budget.end - time.monotonic()), log=lambda s: print(s, flush=True))
    if own is None:
        return False
    sequences = own + default_corpus(_tokenizer(), max_tokens=max_tokens, seed=0)
    written = train_exit_heads(
        _model_name(), EXIT_LAYERS, sequences=sequences, cache=cache_dir() / "exit_data",
        out={k: _head_path(k) for k in EXIT_LAYERS}, epochs=epochs, budget_s=max(1.0, budget.end - time.monotonic()),
        log=lambda s: print(s, flush=True), runtime=full, skip_existing=True, min_train_s=min_train_s,
    )
    return written is not None


def stage_agreement(budget: Budget) -> bool:
    """Teacher-forced top-1 per output position for every k and compression, and the exits' signals."""
    import torch

    from tether.edge.split._exit_head import ExitHead
    from tether.edge.split._hidden_codec import get_codec, roundtrip

    ref = _load("reference")
    agree = _load("agreement")
    todo = [i for i in _prompt_keys(ref) if i not in agree]
    if not todo:
        return len(_prompt_keys(ref)) == len(PROMPTS)
    heads = {k: ExitHead.load(_head_path(k)) for k in EXIT_LAYERS if _head_path(k).is_file()}
    rt, _ = _model()
    big_l = rt.info.num_layers
    for i in todo:
        if budget.spent:
            return False
        t0 = time.perf_counter()
        r = ref[i]
        seq = r["prompt_ids"] + r["output_ids"]
        first = len(r["prompt_ids"]) - 1
        positions = list(range(first, len(seq) - 1))  # position p predicts seq[p + 1]
        entry: dict[str, Any] = {"targets": [seq[p + 1] for p in positions], "k": {}}
        with torch.inference_mode():
            edge_state, hidden, done = rt.new_state(), rt.embed(seq), 0
            for k in sorted(K_LIST):
                hidden = rt.run_layers(edge_state, hidden, done, k)  # [n, H]: the device's rows at layer k
                done = k
                row: dict[str, Any] = {"compression": {}, "exit": {}, "row_bytes": {}}
                for name in COMPRESSIONS:
                    # Bytes of each output position's row sent alone (decode sends one row per token).
                    row["row_bytes"][name] = [get_codec(name).encode(hidden[p:p + 1]).nbytes for p in positions]
                    if name in LOSSLESS_OVER:
                        base = LOSSLESS_OVER[name]
                        if not torch.equal(roundtrip(get_codec(name), hidden), roundtrip(get_codec(base), hidden)):
                            raise AssertionError(f"{name} decoded differently from {base}")
                        row["compression"][name] = row["compression"][base]
                        continue
                    sent = roundtrip(get_codec(name), hidden)
                    state = rt.new_state()
                    out = rt.run_layers(state, sent, k, big_l)
                    rt.release(state)
                    row["compression"][name] = rt.head(out[positions]).argmax(-1).tolist()
                probs = torch.softmax(rt.head(hidden[positions]), dim=-1)
                conf, tokens = probs.max(-1)
                row["exit"]["model-head"] = {"confidence": [round(float(c), 5) for c in conf],
                                             "tokens": tokens.tolist()}
                if k in heads:
                    head = heads[k]
                    probs = torch.softmax(head(hidden[positions].float()), dim=-1)
                    conf, index = probs.max(-1)
                    row["exit"]["trained"] = {"confidence": [round(float(c), 5) for c in conf],
                                              "tokens": head.vocab_ids[index].tolist()}
                entry["k"][str(k)] = row
            rt.release(edge_state)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        agree[i] = entry
        _save("agreement", agree)
        print(f"agreement {int(i) + 1}/{len(PROMPTS)}: {len(positions)} positions, {entry['seconds']}s", flush=True)
    return len(agree) == len(PROMPTS)


def _speed_configs() -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = []
    for rtt in RTTS_MS:
        configs.append({"name": f"cloud@{rtt}", "mode": "cloud", "rtt_ms": rtt})
        for c in COMPRESSIONS:
            configs.append({"name": f"k14-{c}@{rtt}", "mode": "split", "k": 14, "compression": c, "rtt_ms": rtt})
        for k in (7, 21):
            configs.append({"name": f"k{k}-int8@{rtt}", "mode": "split", "k": k, "compression": "int8", "rtt_ms": rtt})
        configs.append({"name": f"auto-int8@{rtt}", "mode": "split", "k": "auto", "compression": "int8",
                        "rtt_ms": rtt})
        for k in (21, 24):
            for kind, label in (("trained", "exit"), ("model-head", "lens"), ("confirmed", "confirmed")):
                configs.append({"name": f"k{k}-int8-{label}@{rtt}", "mode": "split", "k": k, "compression": "int8",
                                "rtt_ms": rtt, "exit": kind})
    return configs


def _exit_threshold(k: int, kind: str) -> float | None:
    """The threshold the agreement stage found best for (k, kind) at >= 98% agreement (else None)."""
    curves = summarize_exits(_load("reference"), _load("agreement"))
    best = curves.get(f"{k}/{kind}", {}).get("best")
    return None if best is None else float(best["threshold"])


async def _speed_async(budget: Budget) -> bool:
    from tether.cloud._config import CloudConfig
    from tether.cloud._manager import SessionManager
    from tether.edge import EdgeClient, EdgeModel, EmulatedLink, InProcessCloud, SplitModel, SplitOptions

    ref = _load("reference")
    speed = _load("speed")
    configs = [c for c in _speed_configs() if c["name"] not in speed]
    if not configs:
        return True
    rt, tok = _model()
    manager = SessionManager(rt, tokenizer=tok, config=CloudConfig(batch_window_s=0.0))
    await manager.start()
    edge = EdgeModel(rt, tok)  # tokenizer; its model would only run if the link dropped
    split_model = SplitModel(rt)
    try:
        for cfg in configs:
            if budget.spent:
                return False
            opts = None
            if cfg["mode"] == "split":
                threshold = None
                trained = cfg.get("exit") in ("trained", "confirmed")
                if cfg.get("exit"):
                    threshold = _exit_threshold(int(cfg["k"]), cfg["exit"])
                    if threshold is None or (trained and not _head_path(int(cfg["k"])).is_file()):
                        speed[cfg["name"]] = {"skipped": "no exit threshold reaches 98% agreement"}
                        _save("speed", speed)
                        continue
                opts = SplitOptions(split_layer=cfg["k"], compression=cfg["compression"], exit_threshold=threshold,
                                    exit_head=_head_path(int(cfg["k"])) if trained else None,
                                    exit_confirm=cfg.get("exit") == "confirmed")
            link = EmulatedLink.with_rtt(InProcessCloud(manager), cfg["rtt_ms"] / 1000, bandwidth_bps=UPLINK_BPS)
            client = EdgeClient(edge, link, mode=cfg["mode"], split=opts, split_model=split_model)
            runs = []
            for i in range(SPEED_PROMPTS):
                r = await client.generate(PROMPTS[i], max_new_tokens=SPEED_TOKENS)
                s = r.stats
                expected = ref.get(str(i), {}).get("output_ids", [])
                same = 0
                for a, b in zip(r.token_ids, expected):
                    if a != b:
                        break
                    same += 1
                run: dict[str, Any] = {"tokens": len(r.token_ids), "wall_s": s.wall_s, "ttft_s": s.ttft_s,
                       "bytes_up": s.bytes_up, "bytes_down": s.bytes_down, "prompt_tokens": s.prompt_tokens,
                       "same_prefix": same, "cloud_compute_s": s.cloud_compute_s,
                       "edge_compute_s": s.edge_compute_s}
                split_info = s.to_dict().get("split")
                if split_info:
                    run["split"] = split_info
                runs.append(run)
            speed[cfg["name"]] = {"config": cfg, "runs": runs}
            _save("speed", speed)
            tps = sum(x["tokens"] for x in runs) / sum(x["wall_s"] for x in runs)
            print(f"speed {cfg['name']}: {tps:.2f} tok/s", flush=True)
    finally:
        split_model.close()
        edge.close()
        await manager.aclose()
    return True


def stage_speed(budget: Budget) -> bool:
    return asyncio.run(_speed_async(budget))


# -- int8-deflate on cached hidden states ------------------------------------------------------

ROWBYTES_SECTION = "split-rowbytes"


def stage_rowbytes() -> dict[str, Any]:
    """int8 vs int8-deflate bytes per row on the real model's layer-k hidden states that exit-head
    training cached (``~/.cache/tether/exit_data``: the self-distilled chat answers, HumanEval
    and stdlib code; stored as float16). No model is loaded: this runs anywhere the cache is.

    Writes ``benchmarks/results/split_rowbytes.json`` and the ``split-rowbytes`` docs section.
    """
    import numpy as np
    from safetensors import safe_open

    from benchmarks._report import environment, update_docs_section, write_results
    from tether.paths import cache_dir
    from tether.protocol import Tensor

    newest: dict[int, Path] = {}  # layer -> the newest collection holding it (older ones overlap)
    for d in sorted((cache_dir() / "exit_data").glob("*/"), key=lambda q: q.stat().st_mtime):
        for f in d.glob("part*-layer*.safetensors"):
            with safe_open(str(f), framework="np") as g:
                meta = json.loads((g.metadata() or {}).get("meta", "{}"))
            if meta.get("model") == _model_name():
                newest[int(meta["layer"])] = d
    layers: dict[str, Any] = {}
    for k, d in sorted(newest.items()):
        sizes, plain, counts, hidden = [], 0, np.zeros(256, np.int64), 0
        for f in sorted(d.glob(f"part*-layer{k}.safetensors")):
            with safe_open(str(f), framework="np") as g:
                rows = g.get_tensor("hidden").astype(np.float32)  # [n, H]
            hidden = rows.shape[1]
            for r in range(rows.shape[0]):  # one row per message, as decode sends them
                t = Tensor.int8_rowwise_deflate(rows[r:r + 1])
                sizes.append(t.nbytes)
                counts += np.bincount(t.data.view(np.uint8).ravel(), minlength=256)
            plain = Tensor.int8_rowwise(rows[:1]).nbytes
        p = counts[counts > 0] / counts.sum()
        arr = np.array(sizes)
        layers[str(k)] = {"rows": len(sizes), "collection": d.name, "int8": plain, "fp32": 4 * hidden,
                          "mean": float(arr.mean()), "p50": float(np.median(arr)), "p99": float(np.percentile(arr, 99)),
                          "max": int(arr.max()), "entropy_bits": float(-(p * np.log2(p)).sum())}
        print(f"layer {k}: {len(sizes)} rows, int8-deflate mean {arr.mean():.0f} B "
              f"({arr.mean() / (4 * hidden):.4f} of fp32), max {arr.max()}", flush=True)
    data = {"model": _model_name(), "layers": layers, "environment": environment(),
            "source": "hidden states cached by exit-head training (float16), one row per message"}
    write_results("split_rowbytes", data, root=ROOT)
    lines = ["## Split computing: int8-deflate on cached hidden states (`tether bench split --stage rowbytes`)", "",
             f"{_model_name()}'s layer-k hidden states that `tether split train-exit` cached (its own chat answers, "
             "HumanEval and stdlib code; stored as float16, so a hair coarser than the live float32 rows), each row "
             "encoded alone as decode sends it. No model runs; raw numbers: `benchmarks/results/split_rowbytes.json`.",
             "", "| k | rows | int8 bytes | int8-deflate mean | median | p99 | largest | mean vs fp32 | largest vs fp32 "
             "| entropy of the int8 values |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in layers.items():
        lines.append(f"| {k} | {v['rows']} | {v['int8']} | {v['mean']:.0f} | {v['p50']:.0f} | {v['p99']:.0f} | "
                     f"{v['max']} | {v['mean'] / v['fp32']:.4f} | {v['max'] / v['fp32']:.4f} | "
                     f"{v['entropy_bits']:.2f} bits |")
    if layers:
        worst = max(layers.values(), key=lambda v: v["max"] / v["fp32"])
        lines += ["", f"Target int8 <= 1/4 of fp32: int8-deflate sends int8's exact values (so int8's agreement "
                  f"in the split table above holds unchanged) in {max(v['mean'] / v['fp32'] for v in layers.values()):.3f} "
                  f"of fp32's bytes on average at the worst layer, and no row above {worst['max'] / worst['fp32']:.3f}."]
    update_docs_section(ROWBYTES_SECTION, "\n".join(lines), path=ROOT / "docs" / "benchmarks.md")
    return data


# -- report -------------------------------------------------------------------------------------


def _positions(ref: dict[str, Any], agree: dict[str, Any]) -> list[str]:
    return [i for i in sorted(agree, key=int) if i in ref]


def summarize_agreement(ref: dict[str, Any], agree: dict[str, Any]) -> dict[str, dict[str, float]]:
    """agreement[k][compression] over every output position of every prompt."""
    out: dict[str, dict[str, float]] = {}
    for k in K_LIST:
        row = {}
        for c in COMPRESSIONS:
            hit = total = 0
            for i in _positions(ref, agree):
                e = agree[i]
                got = e["k"][str(k)]["compression"][c]
                hit += sum(a == b for a, b in zip(got, e["targets"]))
                total += len(e["targets"])
            row[c] = hit / total if total else float("nan")
        out[str(k)] = row
    return out


def summarize_row_bytes(ref: dict[str, Any], agree: dict[str, Any], hidden: int) -> dict[str, dict[str, Any]]:
    """Wire bytes of one output row per compression and k: mean, max (the data-dependent
    int8-deflate varies row to row; the others are the same for every row)."""
    from tether.edge.split._hidden_codec import get_codec

    out: dict[str, dict[str, Any]] = {}
    for c in COMPRESSIONS:
        per_k = {}
        for k in K_LIST:
            sizes = [b for i in _positions(ref, agree)
                     for b in agree[i]["k"][str(k)].get("row_bytes", {}).get(c, [])]
            if sizes:
                per_k[str(k)] = {"mean": sum(sizes) / len(sizes), "max": max(sizes), "rows": len(sizes)}
        fixed = get_codec(c).nbytes(1, hidden)
        worst = max((v["mean"] for v in per_k.values()), default=float(fixed))
        out[c] = {"by_k": per_k, "worst_k_mean": worst, "max": max((v["max"] for v in per_k.values()), default=fixed)}
    return out


EXIT_KINDS = ("model-head", "trained", "confirmed")


def _exit_signals(exits: dict[str, Any], kind: str) -> dict[str, list[Any]] | None:
    """Confidence and token per position for an exit kind; "confirmed" (``exit_confirm=True``)
    exits only where the trained head and the model's head propose the same token, at the
    lower of their confidences (it costs the device both heads)."""
    if kind != "confirmed":
        return exits.get(kind)
    if "trained" not in exits or "model-head" not in exits:
        return None
    t, m = exits["trained"], exits["model-head"]
    conf = [min(a, b) if x == y else 0.0 for a, b, x, y in zip(t["confidence"], m["confidence"], t["tokens"], m["tokens"])]
    return {"confidence": conf, "tokens": t["tokens"]}


def summarize_exits(ref: dict[str, Any], agree: dict[str, Any], base: str = "int8",
                    calibrated: dict[int, float] | None = None) -> dict[str, Any]:
    """Per (k, exit kind): exit rate and agreement at each threshold (non-exited positions take
    the `base` compression's token), and the threshold with the most exits at >= 98% ("best":
    picked on these prompts, so optimistic). `calibrated` maps k to the threshold its trained
    head chose on its own held-out training sequences: that point ("calibrated") is the one a
    user would get without looking at the benchmark."""
    curves: dict[str, Any] = {}
    for k in K_LIST:
        for kind in EXIT_KINDS:
            points = []
            chosen = (calibrated or {}).get(k) if kind == "trained" else None
            for t in (*THRESHOLDS, *([chosen] if chosen is not None and chosen not in THRESHOLDS else [])):
                exits = hit = total = 0
                for i in _positions(ref, agree):
                    e = agree[i]["k"][str(k)]
                    ex = _exit_signals(e["exit"], kind)
                    if ex is None:
                        total = -1
                        break
                    for conf, etok, ctok, target in zip(ex["confidence"], ex["tokens"], e["compression"][base],
                                                        agree[i]["targets"]):
                        use_exit = conf >= t
                        exits += use_exit
                        hit += (etok if use_exit else ctok) == target
                        total += 1
                if total <= 0:
                    break
                points.append({"threshold": t, "exit_rate": exits / total, "agreement": hit / total})
            if points:
                point = next((p for p in points if p["threshold"] == chosen), None)
                points = [p for p in points if p["threshold"] in THRESHOLDS]
                ok = [p for p in points if p["agreement"] >= 0.98]
                best = max(ok, key=lambda p: p["exit_rate"]) if ok else None
                curves[f"{k}/{kind}"] = {"k": k, "kind": kind, "points": points, "best": best, "calibrated": point}
    return curves


def _calibrated_thresholds() -> dict[int, float]:
    """k -> the threshold each trained head recommends (from its held-out calibration)."""
    from tether.edge.split._exit_head import ExitHead

    out = {}
    for k in EXIT_LAYERS:
        if _head_path(k).is_file():
            head = ExitHead.load(_head_path(k))
            if head.threshold is not None:
                out[k] = float(head.threshold)
    return out


def summarize_speed(speed: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, entry in speed.items():
        if "runs" not in entry:
            out[name] = entry
            continue
        runs = entry["runs"]
        tokens = sum(r["tokens"] for r in runs)
        wall = sum(r["wall_s"] for r in runs)
        prompt = sum(r["prompt_tokens"] for r in runs)
        row: dict[str, Any] = {"config": entry["config"], "tokens": tokens, "tokens_per_s": tokens / wall,
                               "bytes_up_per_token": sum(r["bytes_up"] for r in runs) / tokens,
                               "same_prefix": sum(r["same_prefix"] for r in runs) / tokens}
        splits = [r["split"] for r in runs if "split" in r]
        if splits:
            decode = sum(s["hidden_bytes_sent"] - s["prompt_bytes"] for s in splits)
            row["hidden_bytes_per_token"] = decode / tokens
            row["prompt_bytes_per_token"] = sum(s["prompt_bytes"] for s in splits) / max(1, prompt)
            row["exit_rate"] = sum(s["early_exits"] for s in splits) / tokens
            row["split_layer"] = [s["split_layer"] for s in splits]
            if splits[0].get("partition"):
                part = splits[0]["partition"]
                row["partition"] = {"layer": part.get("layer"), "reason": part.get("reason")}
        out[name] = row
    return out


def modelled_speed(speed: dict[str, Any], hidden: int, row_bytes: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s for every (k, compression) at each RTT from the cost model, fed with the profile
    the ``auto`` run measured at that RTT (device and cloud seconds per layer, rtt, uplink) and
    the measured bytes of a row (the data-dependent int8-deflate: its mean at that k)."""
    from tether.edge import PartitionProfile, choose_partition
    from tether.edge.split._hidden_codec import get_codec

    out: dict[str, Any] = {}
    for rtt in RTTS_MS:
        runs = speed.get(f"auto-int8@{rtt}", {}).get("runs", [])
        part = next((r["split"]["partition"] for r in runs if r.get("split", {}).get("partition")), None)
        if not part or "profile" not in part:
            continue
        fields = {k: v for k, v in part["profile"].items() if k != "measured"}
        profile = PartitionProfile(**fields)
        grid = {}
        for k in K_LIST:
            if not 0 < k < profile.num_layers:
                continue
            grid[str(k)] = {c: choose_partition(profile, row_bytes=round(row_bytes[c]["by_k"].get(str(k), {}).get(
                                                    "mean", get_codec(c).nbytes(1, hidden))),
                                                candidates=[k]).cost(k).tokens_per_s for c in COMPRESSIONS}
        out[str(rtt)] = {"profile": fields, "tokens_per_s": grid,
                         "cloud_only_tokens_per_s": choose_partition(profile, row_bytes=4).cloud_only.tokens_per_s}
    return out


def report() -> dict[str, Any]:
    """Write benchmarks/results/split.json, docs/split_bench.png and the docs section (under ROOT)."""
    from benchmarks._report import environment, update_docs_section, write_results
    from tether.edge.split._hidden_codec import get_codec

    ref, agree, speed = _load("reference"), _load("agreement"), _load("speed")
    if not _positions(ref, agree):
        raise SystemExit("no agreement results cached: run the reference and agreement stages first "
                         "(the report would replace the published tables with empty ones)")
    shape = _load("reference").get("model", {})
    hidden, n_layers = int(shape.get("hidden_size", 1536)), int(shape.get("num_layers", 28))
    n_positions = sum(len(agree[i]["targets"]) for i in _positions(ref, agree))
    row_bytes = summarize_row_bytes(ref, agree, hidden)
    bytes_row = {c: row_bytes[c]["worst_k_mean"] for c in COMPRESSIONS}  # fixed sizes: exact
    agreement = summarize_agreement(ref, agree)
    exits = summarize_exits(ref, agree, calibrated=_calibrated_thresholds())
    speed_rows = summarize_speed(speed)
    modelled = modelled_speed(speed, hidden, row_bytes)
    int8_ratio = bytes_row["int8"] / bytes_row["fp32"]
    int8_ratio_framed = (bytes_row["int8"] + FRAMING_BYTES) / (bytes_row["fp32"] + FRAMING_BYTES)
    int8_worst = min((agreement[str(k)]["int8"] for k in K_LIST), default=float("nan"))
    deflate_ratio = bytes_row["int8-deflate"] / bytes_row["fp32"]
    deflate_worst = min((agreement[str(k)]["int8-deflate"] for k in K_LIST), default=float("nan"))
    best_exit = max((c["best"] for c in exits.values() if c["best"]), key=lambda p: p["exit_rate"], default=None)
    best_exit_key = next((key for key, c in exits.items() if c["best"] is best_exit), None)
    calibrated_ok = [c["calibrated"] | {"at": key} for key, c in exits.items()
                     if c.get("calibrated") and c["calibrated"]["agreement"] >= 0.98]
    best_calibrated = max(calibrated_ok, key=lambda p: p["exit_rate"], default=None)
    targets = {
        "int8_bytes_ratio": {"value": int8_ratio, "framed": int8_ratio_framed, "target": 0.25,
                             "met": int8_ratio <= 0.25},
        "int8_agreement": {"value": int8_worst, "target": 0.99, "met": int8_worst >= 0.99},
        "int8_deflate": {"bytes_ratio": deflate_ratio, "max_row_ratio": row_bytes["int8-deflate"]["max"] / bytes_row["fp32"],
                         "framed": (bytes_row["int8-deflate"] + FRAMING_BYTES) / (bytes_row["fp32"] + FRAMING_BYTES),
                         "agreement": deflate_worst, "target": {"bytes_ratio": 0.25, "agreement": 0.99},
                         "met": deflate_ratio <= 0.25 and deflate_worst >= 0.99},
        "early_exit": {"value": best_exit, "at": best_exit_key, "target": {"exit_rate": 0.30, "agreement": 0.98},
                       "met": bool(best_exit and best_exit["exit_rate"] >= 0.30), "calibrated": best_calibrated},
    }
    data = {
        "model": f"{_model_name()} ({n_layers} layers, hidden {hidden}), fp32, split in two",
        "prompts": len(_positions(ref, agree)), "positions": n_positions, "new_tokens": NEW_TOKENS,
        "k": list(K_LIST), "compressions": list(COMPRESSIONS), "bytes_per_row": bytes_row, "row_bytes": row_bytes,
        "agreement": agreement, "exits": exits, "speed": speed_rows, "modelled_speed": modelled, "targets": targets,
        "link": {"rtts_ms": list(RTTS_MS), "uplink_bps": UPLINK_BPS, "speed_prompts": SPEED_PROMPTS,
                 "speed_tokens": SPEED_TOKENS},
        "environment": environment(),
    }
    write_results("split", data, root=ROOT)
    _plot(data)
    update_docs_section(SECTION, _markdown(data), path=ROOT / "docs" / "benchmarks.md")
    return data


def _plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k in data["k"]:
        xs = [data["row_bytes"][c]["by_k"].get(str(k), {}).get("mean", data["bytes_per_row"][c])
              for c in data["compressions"]]
        ys = [100 * data["agreement"][str(k)][c] for c in data["compressions"]]
        ax1.plot(xs, ys, marker="o", label=f"k={k}")
        for x, y, c in zip(xs, ys, data["compressions"]):
            ax1.annotate(c, (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax1.set_xscale("log")
    ax1.axhline(99, color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("hidden-state bytes per token (log)")
    ax1.set_ylabel("top-1 agreement with the unsplit model (%)")
    ax1.set_title("compression vs agreement")
    ax1.legend()
    for key, curve in data["exits"].items():
        xs = [100 * p["exit_rate"] for p in curve["points"]]
        ys = [100 * p["agreement"] for p in curve["points"]]
        ax2.plot(xs, ys, marker=".", label=f"k={curve['k']} {curve['kind']}")
    ax2.axhline(98, color="grey", lw=0.8, ls="--")
    ax2.axvline(30, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("tokens answered on the device (%)")
    ax2.set_ylabel("agreement with the unsplit model (%)")
    ax2.set_title("early exit: thresholds 0.5 .. 0.99")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = ROOT / "docs" / "split_bench.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.2f}%"


def _markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        "## Split computing (`tether bench split`)",
        "",
        f"{data['model']}; {data['prompts']} coding prompts, {data['positions']} output positions of the unsplit "
        f"model's greedy output ({data['new_tokens']} tokens each), teacher-forced. Machine: {env['cpus']} CPUs "
        f"({env['processor']}), torch {env['packages'].get('torch', '?')}, shared with other jobs. "
        "Raw numbers: `benchmarks/results/split.json`.",
        "",
        "**Bytes up and agreement.** Bytes are the hidden row of one position on the wire (values + scales); "
        f"each request adds ~{FRAMING_BYTES} bytes of framing. Agreement: top-1 of the split model (cloud half fed the "
        "decoded row) equal to the unsplit model's greedy token.",
        "",
        "| compression | bytes/token | vs fp32 | " + " | ".join(f"agreement k={k}" for k in data["k"]) + " |",
        "|---|---:|---:|" + "---:|" * len(data["k"]),
    ]
    fp32 = data["bytes_per_row"]["fp32"]
    for c in data["compressions"]:
        b = data["bytes_per_row"][c]
        lines.append(f"| {c} | {b:.0f} | {b / fp32:.3f} | " +
                     " | ".join(_pct(data["agreement"][str(k)][c]) for k in data["k"]) + " |")
    deflate = data["row_bytes"].get("int8-deflate", {}).get("by_k", {})
    if deflate:
        lines += ["", "int8-deflate's size depends on the data (the table shows its mean at the k where it is largest). "
                  "Mean / largest single row by k: " + "; ".join(
                      f"k={k}: {v['mean']:.0f} ({v['mean'] / fp32:.3f} of fp32) / {v['max']} ({v['max'] / fp32:.3f})"
                      for k, v in deflate.items()) + ". Its agreement is int8's: the decoded rows were checked "
                  "equal to int8's at every k, so the cloud half ran once for both."]
    lines += ["", f"**Tokens/s** (end to end, {data['link']['speed_prompts']} prompts x {data['link']['speed_tokens']} "
              f"tokens, emulated link with a {data['link']['uplink_bps'] / 1e6:.0f} Mbit/s uplink; device and cloud "
              "halves share this CPU, so compute is not faster on the cloud side as it would be in a deployment):", "",
              "| configuration | " + " | ".join(f"tok/s @ {r} ms" for r in data["link"]["rtts_ms"]) +
              " | hidden bytes/token | bytes up/token (link, prompt included) | exit rate | k |",
              "|---|" + "---:|" * len(data["link"]["rtts_ms"]) + "---:|---:|---:|---:|"]
    speed = data["speed"]
    bases = sorted({name.split("@")[0] for name in speed}, key=lambda n: (n != "cloud", n))
    for base in bases:
        cells, extra = [], None
        for rtt in data["link"]["rtts_ms"]:
            row = speed.get(f"{base}@{rtt}")
            if row is None or "tokens_per_s" not in row:
                cells.append("—")
                continue
            cells.append(f"{row['tokens_per_s']:.2f}")
            extra = extra or row
        if extra is None:
            continue
        k = extra.get("split_layer")
        hidden_bytes = extra.get("hidden_bytes_per_token")
        lines.append(f"| {base} | " + " | ".join(cells) + " | "
                     + ("—" if hidden_bytes is None else f"{hidden_bytes:.0f}")
                     + f" | {extra['bytes_up_per_token']:.0f} | "
                     f"{_pct(extra.get('exit_rate')) if 'exit_rate' in extra else '—'} | "
                     f"{k[0] if k else '—'} |")
    modelled = data.get("modelled_speed", {})
    if modelled:
        rtts = sorted(modelled, key=int)
        lines += ["", "**Modelled tokens/s** for every k and compression (the auto-partition cost model fed with the "
                  "profile measured at each RTT; " + "; ".join(
                      f"{r} ms: device {1e3 * modelled[r]['profile']['edge_layer_s']:.1f} ms/layer, cloud "
                      f"{1e3 * modelled[r]['profile']['cloud_layer_s']:.1f} ms/layer, rtt "
                      f"{1e3 * modelled[r]['profile']['rtt_s']:.0f} ms" for r in rtts) + "):", "",
                  "| k | " + " | ".join(f"{c} @ {r} ms" for r in rtts for c in data["compressions"]) + " |",
                  "|---|" + "---:|" * (len(rtts) * len(data["compressions"]))]
        for k in data["k"]:
            cells = [f"{modelled[r]['tokens_per_s'].get(str(k), {}).get(c, float('nan')):.2f}"
                     for r in rtts for c in data["compressions"]]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "**Early exit** (teacher-forced; positions not exited take the int8 split token). Exit rate / "
              "agreement per threshold:", "",
              "| exit | " + " | ".join(str(t) for t in THRESHOLDS) + " | best at >= 98% (picked here) | "
              "at the head's own threshold |",
              "|---|" + "---:|" * len(THRESHOLDS) + "---|---|"]
    for key, curve in data["exits"].items():
        pts = {p["threshold"]: p for p in curve["points"]}
        cells = [f"{100 * pts[t]['exit_rate']:.0f}% / {100 * pts[t]['agreement']:.1f}%" if t in pts else "—"
                 for t in THRESHOLDS]
        best = curve["best"]
        best_txt = (f"t={best['threshold']}: {100 * best['exit_rate']:.1f}% local at {100 * best['agreement']:.2f}%"
                    if best else "none")
        cal = curve.get("calibrated")
        cal_txt = (f"t={cal['threshold']:.3g}: {100 * cal['exit_rate']:.1f}% local at {100 * cal['agreement']:.2f}%"
                   if cal else "—")
        lines.append(f"| k={curve['k']} {curve['kind']} | " + " | ".join(cells) + f" | {best_txt} | {cal_txt} |")
    t = data["targets"]
    d = t["int8_deflate"]
    lines += ["", "**Targets.**", "",
              f"- int8 bytes <= 1/4 of fp32: plain int8 {t['int8_bytes_ratio']['value']:.4f} of fp32 per row "
              f"({t['int8_bytes_ratio']['framed']:.4f} with framing) — "
              + ("met." if t["int8_bytes_ratio"]["met"] else
                 "missed by the 4-byte per-token scale (1536 int8 values are exactly 1/4; the scale adds 0.07%). ")
              + f"int8-deflate (the same int8 values, losslessly compressed): {d['bytes_ratio']:.4f} of fp32 on "
              f"average at its worst k ({d['framed']:.4f} with framing; the largest single row "
              f"{d['max_row_ratio']:.4f}) at {_pct(d['agreement'])} agreement (worst k) — "
              + ("met." if d["met"] else "missed."),
              f"- int8 agreement >= 99%: worst k {_pct(t['int8_agreement']['value'])} — "
              + ("met." if t["int8_agreement"]["met"] else "missed."),
              "- early exit >= 30% local at >= 98% agreement: "
              + (f"{_pct(t['early_exit']['value']['exit_rate'])} at {_pct(t['early_exit']['value']['agreement'])} "
                 f"({t['early_exit']['at']}, threshold {t['early_exit']['value']['threshold']}) — "
                 if t["early_exit"]["value"] else "no threshold reaches 98% — ")
              + ("met" if t["early_exit"]["met"] else "missed") + " (the threshold was picked on these prompts). "
              + (f"At a trained head's own threshold (chosen on held-out training sequences, not these prompts): "
                 f"{_pct(t['early_exit']['calibrated']['exit_rate'])} local at "
                 f"{_pct(t['early_exit']['calibrated']['agreement'])} ({t['early_exit']['calibrated']['at']}, "
                 f"threshold {t['early_exit']['calibrated']['threshold']:.3g})."
                 if t["early_exit"].get("calibrated") else
                 ("No trained head's own threshold reaches 98% here."
                  if any(key.endswith("/trained") for key in data["exits"])
                  else "No trained exit heads were measured in this run (model's own head only).")),
              "", "![split computing](split_bench.png)"]
    return "\n".join(lines)


# -- entry points -------------------------------------------------------------------------------

STAGES = {"reference": stage_reference, "train": stage_train, "agreement": stage_agreement, "speed": stage_speed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tether bench split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "report", "rowbytes", "all"], default="all",
                        help="start at this stage and go on with the later ones while the budget lasts "
                             "(every stage resumes from its cache); 'report' only rewrites the outputs")
    parser.add_argument("--only", action="store_true", help="run just the --stage named, not the later ones")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop a model stage after this many seconds (resumable); 'all' shares it")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.stage == "rowbytes":  # no model: cached hidden states only
        stage_rowbytes()
        return
    order = list(STAGES)
    if args.stage in ("all", "report"):
        names = order if args.stage == "all" else []
    else:
        names = [args.stage] if args.only else order[order.index(args.stage):]
    complete = True
    for name in names:
        done = STAGES[name](budget)
        print(f"stage {name}: {'done' if done else 'incomplete (run again)'}", flush=True)
        if not done:
            complete = False
            break
    if names and complete:
        print("split benchmark: all stages done", flush=True)
    if args.stage == "report" or (names and names[-1] == order[-1] and complete):
        data = report()
        print(json.dumps(data["targets"], indent=2, default=str))


def register(bench_app: Any) -> None:
    """Add `tether bench split` (options as for ``python -m benchmarks.split``)."""
    @bench_app.command(  # type: ignore[untyped-decorator]
        "split",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help="Split computing on the real cloud model: bytes, agreement, tokens/s, early exit (--help lists options).",
    )
    def _split(ctx: typer.Context) -> None:
        main(list(ctx.args))


if __name__ == "__main__":
    main()

"""Decode speed of TorchCausalLM vs transformers' own `generate` (not collected by pytest).

Run (it loads a real model, so take the shared big-memory lock):

    flock /tmp/tether-bigmem.lock python tests/runtime/bench_torch_runtime.py [name] [--bf16]

Prints greedy decode tokens/s (runtime vs HF, interleaved, best of N) and the aggregate
throughput of `extend_batch` decode steps for batch sizes 1, 2, 4, 8.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from tether.runtime import TorchCausalLM

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."


def runtime_greedy(lm: TorchCausalLM, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens and the decode time (excluding prefill)."""
    state = lm.new_state()
    logits = lm.prefill(state, prompt)
    out = [int(logits[-1].argmax())]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        out.append(int(lm.extend(state, out[-1:])[-1].argmax()))
    dt = time.perf_counter() - t0
    lm.release(state)
    return out, dt


def hf_greedy(model: Any, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens and the time per token of `generate`, prefill cost subtracted."""
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        dt = time.perf_counter() - t0 - t_prefill
    return out[0, len(prompt):].tolist(), dt


def best(fn: Callable[[], tuple[list[int], float]], reps: int) -> tuple[list[int], float]:
    runs = [fn() for _ in range(reps)]
    return runs[0][0], min(dt for _, dt in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", nargs="?", default="qwen2.5-coder-0.5b")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for this run (1 gives stable numbers on a busy machine)")
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # this script only; the library never does this

    from tether.models import load_hf

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    t0 = time.perf_counter()
    model, tokenizer = load_hf(args.name, dtype=dtype, progress=False)
    print(f"loaded {args.name} ({dtype}) in {time.perf_counter() - t0:.1f}s, "
          f"{torch.get_num_threads()} threads")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"]
    variants = {"runtime": TorchCausalLM(model, name=args.name)}
    if dtype == torch.float32:  # the oneDNN switch only matters for fp32
        variants["runtime (onednn_fp32=False)"] = TorchCausalLM(
            model, name=args.name, onednn_fp32=False
        )
    n = args.tokens

    times: dict[str, list[float]] = {name: [] for name in [*variants, "HF generate"]}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.reps):  # interleave so machine noise hits all alike
        for name, lm in variants.items():
            tokens[name], dt = runtime_greedy(lm, prompt, n)
            times[name].append(dt)
        tokens["HF generate"], dt = hf_greedy(model, prompt, n)
        times["HF generate"].append(dt)
    print(f"prompt {len(prompt)} tokens, decode {n - 1} steps (best of {args.reps})")
    for name, ts in times.items():
        same = tokens[name] == tokens["HF generate"]
        print(f"  {name:28s} {(n - 1) / min(ts):6.2f} tok/s   same tokens as HF: {same}")

    # Aggregate decode throughput of a ragged batch (each sequence one new token per step).
    steps = 12
    for name, lm in variants.items():
        for batch in [int(b) for b in args.batches.split(",") if b]:
            states = [lm.new_state() for _ in range(batch)]
            lm.extend_batch(states, [prompt] * batch)
            next_ids = [[tokens[name][0]]] * batch
            lm.extend_batch(states, next_ids)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                lm.extend_batch(states, next_ids)
            dt = time.perf_counter() - t0
            print(f"  {name} extend_batch B={batch}: {batch * steps / dt:6.2f} tok/s aggregate, "
                  f"{dt / steps * 1000:6.1f} ms/step")
            for s in states:
                lm.release(s)
        # A block of k new tokens in one extend (draft verification), after the prompt.
        state = lm.new_state()
        lm.prefill(state, prompt)
        for k in (1, 4, 8):
            t0 = time.perf_counter()
            for _ in range(3):
                lm.extend(state, [tokens[name][0]] * k)
                lm.truncate(state, len(prompt))
            print(f"  {name} extend k={k}: {(time.perf_counter() - t0) / 3 * 1000:6.1f} ms")
        lm.release(state)


if __name__ == "__main__":
    main()

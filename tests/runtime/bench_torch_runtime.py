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
    lm = TorchCausalLM(model, name=args.name)
    n = args.tokens

    ours_hf = []
    for _ in range(args.reps):  # interleave so machine noise hits both alike
        ours_hf.append((runtime_greedy(lm, prompt, n), hf_greedy(model, prompt, n)))
    ours_tokens, hf_tokens = ours_hf[0][0][0], ours_hf[0][1][0]
    t_ours = min(o[1] for o, _ in ours_hf)
    t_hf = min(h[1] for _, h in ours_hf)
    print(f"prompt {len(prompt)} tokens, decode {n - 1} steps")
    print(f"  runtime   {(n - 1) / t_ours:6.2f} tok/s")
    print(f"  HF        {(n - 1) / t_hf:6.2f} tok/s   same tokens: {ours_tokens == hf_tokens}")

    # Aggregate decode throughput of a ragged batch (each sequence one new token per step).
    steps = 12
    for batch in [int(b) for b in args.batches.split(",") if b]:
        states = [lm.new_state() for _ in range(batch)]
        lm.extend_batch(states, [prompt] * batch)
        next_ids = [[ours_tokens[0]]] * batch
        lm.extend_batch(states, next_ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            lm.extend_batch(states, next_ids)
        dt = time.perf_counter() - t0
        print(f"  extend_batch B={batch}: {batch * steps / dt:6.2f} tok/s aggregate, "
              f"{dt / steps * 1000:6.1f} ms/step")
        for s in states:
            lm.release(s)


if __name__ == "__main__":
    main()

"""The real cloud model: verify-based greedy decoding equals its own greedy generation."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the difference between TCP and UDP? One sentence.",
]
N = 24


@pytest.fixture(scope="module")
def real_cloud() -> tuple[Any, Any]:
    from tether.models import load_hf

    return load_hf("qwen2.5-coder-1.5b", progress=False)


@pytest.mark.real_model
@pytest.mark.slow
async def test_real_cloud_verify_decoding_equals_hf_greedy(real_cloud: tuple[Any, Any]) -> None:
    from tether.cloud import SessionManager
    from tether.runtime import TorchCausalLM

    hf_model, tokenizer = real_cloud
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, top_p=None,
                                    top_k=None, temperature=None)
            refs.append(out[0, len(ids):].tolist())
    lm = TorchCausalLM(hf_model, name="qwen2.5-coder-1.5b")
    async with SessionManager(lm, tokenizer=tokenizer) as m:

        async def decode(i: int) -> list[int]:
            rng = random.Random(i)
            s = await m.open_session()
            await s.append(prompts[i])
            got: list[int] = []
            while len(got) < N and not (set(got) & set(lm.info.eos_token_ids)):
                good = refs[i][len(got):len(got) + 4]
                draft = good[: rng.randrange(0, 5)] + [rng.randrange(1000)]  # right for a while, then wrong
                r = await s.verify(draft)
                got += draft[:r.accepted] + [r.next_token]
            await s.close()
            return got[:N]

        outs = await asyncio.gather(*(decode(i) for i in range(len(prompts))))  # batched across sessions
    eos = set(lm.info.eos_token_ids)

    def upto_eos(ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
        return ids

    for out, ref in zip(outs, refs):
        assert upto_eos(out) == upto_eos(ref), (tokenizer.decode(out), tokenizer.decode(ref))

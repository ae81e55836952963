"""TorchCausalLM against Hugging Face's own forward and generate, on tiny random models.

Qwen2 (the real vocabulary, 4 layers, GQA 2:1, q/k/v biases) comes from conftest; a Llama
model is built here with a small vocabulary, GQA 4:1, head_dim != hidden/heads and llama3
rope scaling, to prove both architectures and that the HF rotary module is honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from tether.errors import ConfigurationError, RuntimeStateError
from tether.runtime import TorchCausalLM, TorchKVState

ATOL = 1e-4


def build_tiny_llama(seed: int = 0, *, attn_implementation: str = "sdpa") -> Any:
    """A tiny random LlamaForCausalLM: vocab 512, 3 layers, 4 query heads over 1 kv head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,  # q_proj is 64 -> 128: head_dim is not hidden/heads
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=[1, 2],
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # tied: also scales the embeddings; decisive argmax
    return model.eval()


@pytest.fixture(scope="module")
def qwen(tiny_hf_model: Any) -> TorchCausalLM:
    return TorchCausalLM(tiny_hf_model, name="tiny-qwen2")


@pytest.fixture(scope="module")
def llama_hf() -> Any:
    return build_tiny_llama()


@pytest.fixture(scope="module")
def llama(llama_hf: Any) -> TorchCausalLM:
    return TorchCausalLM(llama_hf, name="tiny-llama")


@pytest.fixture(params=["qwen2", "llama"])
def arch(request: pytest.FixtureRequest, tiny_hf_model: Any, qwen: TorchCausalLM,
         llama_hf: Any, llama: TorchCausalLM) -> tuple[Any, TorchCausalLM]:
    """(hf_model, runtime) for each architecture."""
    return (tiny_hf_model, qwen) if request.param == "qwen2" else (llama_hf, llama)


def random_ids(lm: TorchCausalLM, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.info.vocab_size, (n,), generator=g).tolist()


def hf_logits(hf_model: Any, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([list(ids)])).logits[0].float()


def greedy(lm: TorchCausalLM, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding through the runtime, stopping after an eos token like `generate`."""
    state = lm.new_state()
    logits = lm.prefill(state, prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        if token in lm.info.eos_token_ids:
            break
        logits = lm.extend(state, [token])
    lm.release(state)
    return out


def hf_greedy(hf_model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=hf_model.config.bos_token_id,
        )
    return out[0, len(prompt):].tolist()


# -- construction and info ------------------------------------------------------------------


def test_info_from_config(qwen: TorchCausalLM, llama: TorchCausalLM) -> None:
    assert qwen.info.name == "tiny-qwen2"
    assert (qwen.info.vocab_size, qwen.info.num_layers, qwen.info.hidden_size) == (151_936, 4, 64)
    assert qwen.info.eos_token_ids == (151_645,)
    assert qwen.info.max_positions == 2048
    assert llama.info.eos_token_ids == (1, 2)  # a list in the config
    assert (llama.info.vocab_size, llama.info.num_layers) == (512, 3)


def test_rejects_unsupported_configs(tiny_hf_model: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"max_positions must be in \[1, 2048\]"):
        TorchCausalLM(tiny_hf_model, max_positions=4096)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigurationError, match=r"supports model types \('qwen2', 'llama'\), got 'gpt2'"):
        TorchCausalLM(gpt2)


# -- logits against HF ----------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_sequence_logits_match_hf(attn_implementation: str) -> None:
    from tiny_models import build_tiny_qwen2

    for hf_model in (build_tiny_qwen2(seed=3), build_tiny_llama(seed=3)):
        hf_model.set_attn_implementation(attn_implementation)
        lm = TorchCausalLM(hf_model)
        ids = random_ids(lm, 37, seed=1)
        logits = lm.prefill(lm.new_state(), ids)
        assert logits.dtype == torch.float32 and logits.shape == (37, lm.info.vocab_size)
        torch.testing.assert_close(logits, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_bf16_matches_hf_bf16() -> None:
    from tiny_models import build_tiny_qwen2

    hf_model = build_tiny_qwen2(seed=4).to(torch.bfloat16)
    lm = TorchCausalLM(hf_model)
    assert lm.dtype == torch.bfloat16
    ids = random_ids(lm, 24, seed=2)
    state = lm.new_state()
    logits = torch.cat([lm.prefill(state, ids[:20]), lm.extend(state, ids[20:])])
    assert logits.dtype == torch.float32
    expected = hf_logits(hf_model, ids)
    # bf16 keeps ~3 significant digits; compare loosely and require the same argmax almost everywhere.
    torch.testing.assert_close(logits, expected, atol=0.15 * expected.abs().max().item(), rtol=0)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("onednn_fp32", [True, False])
def test_large_matrices_through_onednn_match_hf(onednn_fp32: bool) -> None:
    """Matrices big enough for the oneDNN fp32 path (and the plain path) give HF's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.runtime import _torch

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=8192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).eval()
    lm = TorchCausalLM(hf_model, onednn_fp32=onednn_fp32)
    gate = lm._ops[0].gate
    uses_onednn = getattr(gate, "func", None) is _torch._onednn_linear
    assert uses_onednn == (onednn_fp32 and _torch._onednn_linear_works())
    ids = random_ids(lm, 21, seed=4)
    state = lm.new_state()
    logits = torch.cat([lm.prefill(state, ids[:16]), lm.extend(state, ids[16:19]), lm.extend(state, ids[19:])])
    torch.testing.assert_close(logits, hf_logits(hf_model, ids), atol=ATOL, rtol=1e-4)


# -- cache semantics ------------------------------------------------------------------------


def test_prefill_then_extend_equals_prefill_of_all(arch: tuple[Any, TorchCausalLM]) -> None:
    _, lm = arch
    ids = random_ids(lm, 30, seed=5)
    whole = lm.prefill(lm.new_state(), ids)
    state = lm.new_state()
    parts = [lm.prefill(state, ids[:11]), lm.extend(state, ids[11:12]), lm.extend(state, ids[12:])]
    assert state.length == 30
    torch.testing.assert_close(torch.cat(parts), whole, atol=ATOL, rtol=0)


def test_truncate_then_reextend_reproduces_logits(arch: tuple[Any, TorchCausalLM]) -> None:
    _, lm = arch
    ids = random_ids(lm, 20, seed=6)
    state = lm.new_state()
    lm.prefill(state, ids[:12])
    expected = lm.extend(state, ids[12:])
    # Roll back rejected "drafts" (different tokens), then take the real continuation.
    lm.truncate(state, 12)
    assert state.length == 12
    lm.extend(state, random_ids(lm, 5, seed=99))
    lm.truncate(state, 12)
    torch.testing.assert_close(lm.extend(state, ids[12:]), expected, atol=ATOL, rtol=0)
    lm.truncate(state, 0)
    assert state.length == 0
    lm.prefill(state, ids[:3])  # truncate(0) makes prefill legal again


def test_fork_is_independent(qwen: TorchCausalLM) -> None:
    ids = random_ids(qwen, 16, seed=7)
    state = qwen.new_state()
    qwen.prefill(state, ids[:10])
    twin = qwen.fork(state)
    assert isinstance(twin, TorchKVState) and twin.length == 10
    a = qwen.extend(state, ids[10:])
    b_other = qwen.extend(twin, random_ids(qwen, 6, seed=8))  # twin diverges
    assert not torch.allclose(a, b_other)
    qwen.truncate(twin, 10)
    torch.testing.assert_close(qwen.extend(twin, ids[10:]), a, atol=ATOL, rtol=0)
    qwen.release(state)
    assert twin.length == 16  # releasing the original leaves the fork alive


def test_cache_grows_past_initial_capacity(llama: TorchCausalLM, llama_hf: Any) -> None:
    ids = random_ids(llama, 300, seed=9)  # beyond the first 256-position allocation
    state = llama.new_state()
    logits = torch.cat([llama.prefill(state, ids[:250])] + [llama.extend(state, [t]) for t in ids[250:]])
    torch.testing.assert_close(logits, hf_logits(llama_hf, ids), atol=ATOL, rtol=0)


def test_empty_extend_returns_no_rows(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    assert qwen.extend(state, []).shape == (0, 151_936)
    assert state.length == 0


def test_outputs_are_ordinary_tensors(qwen: TorchCausalLM) -> None:
    """Computed under inference_mode, but callers may still modify the results in place."""
    state = qwen.new_state()
    logits = qwen.prefill(state, [1, 2, 3])
    logits[-1] /= 0.7  # e.g. temperature scaling; fails on an inference tensor
    hidden = qwen.embed([4])
    hidden += 0.0
    out = qwen.run_layers(state, hidden, 0, qwen.info.num_layers)
    out *= 1.0
    head = qwen.head(out)
    head -= head.max()
    assert not any(t.is_inference() for t in (logits, hidden, out, head))


# -- misuse ---------------------------------------------------------------------------------


def test_released_state_raises(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    qwen.prefill(state, [1, 2, 3])
    qwen.release(state)
    qwen.release(state)  # twice is harmless
    msg = r"this KV state of model 'tiny-qwen2' was released; create a new one with new_state\(\)"
    for use in (
        lambda: qwen.extend(state, [4]),
        lambda: qwen.truncate(state, 1),
        lambda: qwen.fork(state),
        lambda: qwen.run_layers(state, qwen.embed([4]), 0, 2),
        lambda: state.length,
    ):
        with pytest.raises(RuntimeStateError, match=msg):
            use()


def test_over_length_raises_and_leaves_state_intact(tiny_hf_model: Any) -> None:
    lm = TorchCausalLM(tiny_hf_model, name="short", max_positions=8)
    state = lm.new_state()
    lm.prefill(state, [1, 2, 3, 4, 5, 6])
    with pytest.raises(
        RuntimeStateError, match=r"appending 3 positions to 6 would exceed model 'short''s max_positions of 8"
    ):
        lm.extend(state, [7, 8, 9])
    assert state.length == 6
    lm.extend(state, [7, 8])  # exactly at the limit is fine
    with pytest.raises(RuntimeStateError, match="max_positions of 8"):
        lm.extend(state, [9])


def test_truncate_limits(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    qwen.prefill(state, [1, 2, 3, 4])
    with pytest.raises(RuntimeStateError, match=r"cannot truncate to 5 positions: this KV state holds only 4"):
        qwen.truncate(state, 5)
    with pytest.raises(RuntimeStateError, match=r"cannot truncate to a negative length \(-1\)"):
        qwen.truncate(state, -1)
    assert state.length == 4


def test_prefill_needs_empty_state(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    qwen.prefill(state, [1, 2])
    with pytest.raises(RuntimeStateError, match="prefill needs an empty state, this one holds 2 positions"):
        qwen.prefill(state, [3])


def test_state_of_another_model_raises(qwen: TorchCausalLM, llama: TorchCausalLM, tiny_hf_model: Any) -> None:
    with pytest.raises(RuntimeStateError, match="belongs to model 'tiny-llama', not 'tiny-qwen2'"):
        qwen.extend(llama.new_state(), [1])
    # Another instance over the same weights is still another model.
    twin = TorchCausalLM(tiny_hf_model, name="tiny-qwen2")
    with pytest.raises(RuntimeStateError, match="belongs to model 'tiny-qwen2', not 'tiny-qwen2'"):
        twin.extend(qwen.new_state(), [1])


def test_bad_arguments_raise(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    with pytest.raises(ConfigurationError, match=r"token ids must be in \[0, 151936\)"):
        qwen.extend(state, [151_936])
    with pytest.raises(ConfigurationError, match=r"layer range \[2, 5\) is not within \[0, 4\)"):
        qwen.run_layers(state, qwen.embed([1]), 2, 5)
    with pytest.raises(ConfigurationError, match=r"hidden states must be \[n, 64\], got \(1, 32\)"):
        qwen.run_layers(state, torch.zeros(1, 32), 0, 4)
    with pytest.raises(RuntimeStateError, match="same state twice"):
        qwen.extend_batch([state, state], [[1], [2]])
    assert state.length == 0


def test_partial_range_raises(qwen: TorchCausalLM) -> None:
    state = qwen.new_state()
    qwen.run_layers(state, qwen.embed([1, 2]), 0, 2)
    with pytest.raises(RuntimeStateError, match=r"layers \[0, 4\) of this KV state hold different lengths"):
        qwen.run_layers(state, qwen.embed([3]), 0, 4)


# -- split computing ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_split_layers_equal_full_forward(arch: tuple[Any, TorchCausalLM], where: str) -> None:
    hf_model, lm = arch
    k = {"first": 1, "middle": lm.info.num_layers // 2, "last": lm.info.num_layers - 1}[where]
    ids = random_ids(lm, 18, seed=10 + k)
    assert 0 < k < lm.info.num_layers
    edge, cloud = lm.new_state(), lm.new_state()  # edge runs [0, k), cloud [k, L)
    L = lm.info.num_layers
    chunks = [ids[:12], ids[12:13], ids[13:14], ids[14:15], ids[15:18]]
    logits = []
    held = 0
    for chunk in chunks:
        hidden = lm.run_layers(edge, lm.embed(chunk), 0, k)
        logits.append(lm.head(lm.run_layers(cloud, hidden, k, L)))
        held += len(chunk)
        assert edge.length == cloud.length == held
    assert cloud.layer_length(0) == 0 and edge.layer_length(L - 1) == 0
    empty = lm.embed(ids[:2])
    assert lm.run_layers(cloud, empty, k, k) is not None  # an empty range is a no-op
    assert cloud.length == held
    torch.testing.assert_close(torch.cat(logits), hf_logits(hf_model, ids), atol=ATOL, rtol=0)
    # The cloud half rolls back like a full state.
    lm.truncate(cloud, 12)
    lm.truncate(edge, 12)
    hidden = lm.run_layers(edge, lm.embed(ids[12:]), 0, k)
    torch.testing.assert_close(
        lm.head(lm.run_layers(cloud, hidden, k, L)), torch.cat(logits)[12:], atol=ATOL, rtol=0
    )


# -- ragged batching ------------------------------------------------------------------------


def test_extend_batch_equals_sequential_extends(arch: tuple[Any, TorchCausalLM]) -> None:
    _, lm = arch
    prompts = [random_ids(lm, n, seed=20 + n) for n in (5, 17, 9)]
    new = [random_ids(lm, n, seed=40 + n) for n in (1, 4, 3)]

    sequential = [lm.new_state() for _ in prompts]
    expected_prefill = [lm.prefill(s, p) for s, p in zip(sequential, prompts)]
    expected_new = [lm.extend(s, t) for s, t in zip(sequential, new)]

    batched = [lm.new_state() for _ in prompts]
    got_prefill = lm.extend_batch(batched, prompts)  # a ragged prefill of three prompts
    got_new = lm.extend_batch(batched, new)
    for got, want in zip(got_prefill + got_new, expected_prefill + expected_new):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert [s.length for s in batched] == [6, 21, 12]

    # A decode step with one sequence idle (no new tokens) and one fresh sequence.
    fresh = lm.new_state()
    steps = lm.extend_batch([batched[0], batched[1], fresh], [[7], [], [3, 4]])
    assert [t.shape[0] for t in steps] == [1, 0, 2]
    torch.testing.assert_close(steps[0], lm.extend(sequential[0], [7]), atol=ATOL, rtol=0)
    torch.testing.assert_close(steps[2], lm.prefill(lm.new_state(), [3, 4]), atol=ATOL, rtol=0)


def test_extend_batch_failure_changes_nothing(tiny_hf_model: Any) -> None:
    lm = TorchCausalLM(tiny_hf_model, max_positions=8)
    a, b = lm.new_state(), lm.new_state()
    lm.prefill(b, [1] * 7)
    with pytest.raises(RuntimeStateError, match="max_positions of 8"):
        lm.extend_batch([a, b], [[1, 2], [3, 4]])
    assert (a.length, b.length) == (0, 7)


# -- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_hf_generate(arch: tuple[Any, TorchCausalLM], seed: int) -> None:
    hf_model, lm = arch
    prompt = random_ids(lm, 6 + 5 * seed, seed=100 + seed)
    assert greedy(lm, prompt, 24) == hf_greedy(hf_model, prompt, 24)


# -- other devices --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_hf_on_cuda(dtype: torch.dtype) -> None:
    """The runtime follows the weights' device; logits still come back as CPU float32."""
    from tiny_models import build_tiny_qwen2

    for hf_model in (build_tiny_qwen2(seed=5), build_tiny_llama(seed=5)):
        hf_model = hf_model.to(device="cuda", dtype=dtype)
        lm = TorchCausalLM(hf_model)
        ids = random_ids(lm, 29, seed=3)
        state = lm.new_state()
        logits = torch.cat([lm.prefill(state, ids[:20])] + [lm.extend(state, [t]) for t in ids[20:]])
        assert logits.device.type == "cpu" and logits.dtype == torch.float32
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
        if dtype == torch.float32:
            # TF32 may be on for matmuls; allow for it.
            torch.testing.assert_close(logits, expected, atol=5e-3 * expected.abs().max().item(), rtol=0)
        else:
            assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
        batched = lm.extend_batch([lm.new_state(), lm.new_state()], [ids[:7], ids[:20]])
        torch.testing.assert_close(batched[1], logits[:20], atol=0.02 * logits.abs().max().item(), rtol=0)
        if dtype == torch.float32:
            prompt = ids[:9]
            ids_t = torch.tensor([prompt], device="cuda")
            with torch.no_grad():
                want = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=16,
                                         do_sample=False, pad_token_id=0)[0, 9:].tolist()
            assert greedy(lm, prompt, 16) == want


# -- the real edge model --------------------------------------------------------------------

CHAT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a SQL LEFT JOIN does, in two sentences.",
    "What does `git rebase -i` do?",
]


@pytest.fixture(scope="module")
def real_edge() -> tuple[Any, Any]:
    """The real edge model in fp32 (module scope: freed once this module's tests are done)."""
    from tether.models import load_hf

    return load_hf("qwen2.5-coder-0.5b", progress=False)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("prompt", CHAT_PROMPTS[:1])  # one real prompt: the tiny models cover the rest
def test_real_edge_greedy_matches_hf_generate(real_edge: tuple[Any, Any], prompt: str) -> None:
    hf_model, tokenizer = real_edge
    lm = TorchCausalLM(hf_model, name="qwen2.5-coder-0.5b")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"]
    ours = greedy(lm, ids, 32)
    assert ours == hf_greedy(hf_model, ids, 32), tokenizer.decode(ours)

"""The torch backend: our own forward pass over a Hugging Face Qwen2/Llama model's weights.

What belongs here: the layer math (attention with our KV cache, rope, MLP) and the checks on
arguments. What does not: the cache's storage (`_kvcache.py`), sampling or generation loops.

Design follows gpt-fast: one small, readable forward with shapes commented and asserted.
Every forward is ragged-batched: the new tokens of all sequences are concatenated into one
[N, hidden] activation, so each projection and MLP reads its weights once per step for the
whole batch (decode on a CPU is memory-bound, so this is where server throughput comes
from); only attention runs per sequence, against that sequence's own cache. `extend` and
`run_layers` are the one-sequence case of the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tether.errors import ConfigurationError, RuntimeStateError
from tether.runtime._base import KVState, LayerwiseLM, ModelInfo
from tether.runtime._kvcache import TorchKVState

if TYPE_CHECKING:  # importing transformers costs seconds; only the type checker needs it
    from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")

# A linear layer bound to its weights: [..., in] -> [..., out].
Linear = Callable[[torch.Tensor], torch.Tensor]

# oneDNN pays off for large matrices only (measured on the 2-core AMD EPYC these run on, fp32,
# 1-8 rows): 1.3-2x faster for the MLP and LM head of the real models, slower for
# matrices under ~1M entries or with few input features (its fixed cost dominates).
_ONEDNN_MIN_WEIGHTS = 2_000_000
_ONEDNN_MIN_IN_FEATURES = 256


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # oneDNN's fp32 matmul without prepacking, so the weights are not copied. The default
    # fp32 path (MKL sgemm) reads the weights 1.5x slower for one row and 2x slower for
    # 2-8 rows (decode batches, draft blocks) here.
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this torch build has the (private) oneDNN linear op and it agrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
            return bool(torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing or renamed
        return False


def _bind_linear(module: torch.nn.Module, *, onednn: bool) -> Linear:
    """A fast callable for one linear layer, chosen once so the forward pays no dispatch."""
    if type(module) is not torch.nn.Linear:  # a subclass may change forward (LoRA, quantised)
        return module  # type: ignore[no-any-return]
    weight, bias = module.weight, module.bias
    large = weight.numel() >= _ONEDNN_MIN_WEIGHTS and weight.shape[1] >= _ONEDNN_MIN_IN_FEATURES
    if onednn and large:
        return functools.partial(_onednn_linear, weight=weight, bias=bias)
    # F.linear directly skips nn.Module.__call__ (hooks, a few microseconds x 7 x layers).
    return functools.partial(F.linear, weight=weight, bias=bias)


@dataclass(frozen=True, slots=True)
class _LayerOps:
    """One decoder layer's pieces, bound once at construction."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate: Linear
    up: Linear
    down: Linear
    act: Callable[[torch.Tensor], torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1), the rope convention of HF Qwen2/Llama."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eos_token_ids(hf_model: Any) -> tuple[int, ...]:
    """End-of-sequence ids as `generate` would use them: generation_config first, then config."""
    generation_config = getattr(hf_model, "generation_config", None)
    raw = getattr(generation_config, "eos_token_id", None)
    if raw is None:
        raw = getattr(hf_model.config, "eos_token_id", None)
    if raw is None:
        return ()
    ids = [raw] if isinstance(raw, int) else list(raw)
    return tuple(dict.fromkeys(int(i) for i in ids))  # dedupe, keep order


class TorchCausalLM(LayerwiseLM):
    """A `LayerwiseLM` running a loaded Hugging Face Qwen2 or Llama causal LM with PyTorch.

    The weights stay in (and are shared with) the HF model; nothing is copied. Compute
    runs in the model's dtype (fp32 or bf16) under `torch.inference_mode()`; logits are
    returned as float32 on the CPU. The HF model's own `rotary_emb` supplies cos/sin, so
    its rope scaling variant (llama3, yarn, dynamic...) is honoured.

    Args:
        hf_model: a `Qwen2ForCausalLM` or `LlamaForCausalLM` (or any model with the same
            module layout: `model.embed_tokens`, `model.layers[i].{input_layernorm,
            self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}`, `model.norm`,
            `model.rotary_emb`, `lm_head`). It is not modified.
        name: the name reported in `info.name` and in error messages; defaults to the
            config's `_name_or_path`, else its `model_type`.
        max_positions: the most positions one sequence may hold; defaults to (and may
            not exceed) the config's `max_position_embeddings`.
        onednn_fp32: for fp32 weights on the CPU, run the large linear layers (MLP, LM
            head) through oneDNN rather than torch's default (MKL) path: 1.3-2x faster on
            the CPUs measured, most for several rows at once; logits stay equal to HF's
            within float tolerance. Ignored for bf16 (already oneDNN), other devices, or a
            torch build without the op. Set False to use exactly HF's kernels.

    Build it after moving or casting the HF model: the device and dtype are read here.

    Raises:
        ConfigurationError: the architecture is not supported (another model type, or
            sliding-window attention layers), or `max_positions` is out of range.
    """

    def __init__(
        self,
        hf_model: PreTrainedModel,
        *,
        name: str | None = None,
        max_positions: int | None = None,
        onednn_fp32: bool = True,
    ) -> None:
        config = hf_model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigurationError(
                f"TorchCausalLM supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
            )
        layer_types = getattr(config, "layer_types", None) or ()
        if any(t != "full_attention" for t in layer_types):
            # Qwen2 can enable sliding-window layers; our cache keeps every position.
            raise ConfigurationError(
                f"TorchCausalLM supports full attention only; this config has layer types "
                f"{sorted(set(layer_types))}"
            )
        limit = int(config.max_position_embeddings)
        if max_positions is None:
            max_positions = limit
        if not 0 < max_positions <= limit:
            raise ConfigurationError(
                f"max_positions must be in [1, {limit}] for this model, got {max_positions}"
            )

        decoder = hf_model.model
        self._hf_model = hf_model  # keeps the weights alive for as long as we use them
        self._embed_tokens: torch.nn.Module = decoder.embed_tokens
        self._layers: list[torch.nn.Module] = list(decoder.layers)
        self._norm: torch.nn.Module = decoder.norm
        self._rotary_emb: torch.nn.Module = decoder.rotary_emb
        self._lm_head: torch.nn.Module = hf_model.lm_head

        attn = self._layers[0].self_attn
        self._num_heads = int(config.num_attention_heads)
        self._num_kv_heads = int(config.num_key_value_heads)
        self._head_dim = int(attn.head_dim)
        self._groups = self._num_heads // self._num_kv_heads  # query heads per kv head (GQA)
        self._scaling = float(attn.scaling)
        weight = self._embed_tokens.weight
        self._dtype: torch.dtype = weight.dtype
        self._device: torch.device = weight.device
        assert self._groups * self._num_kv_heads == self._num_heads
        mlp = self._layers[0].mlp
        for part in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, part):
                raise ConfigurationError(f"TorchCausalLM needs a gated MLP; this one has no {part}")
        use_onednn = (
            onednn_fp32
            and self._dtype == torch.float32
            and self._device.type == "cpu"
            and _onednn_linear_works()
        )
        self._ops = [
            _LayerOps(
                input_norm=layer.input_layernorm,
                q=_bind_linear(layer.self_attn.q_proj, onednn=use_onednn),
                k=_bind_linear(layer.self_attn.k_proj, onednn=use_onednn),
                v=_bind_linear(layer.self_attn.v_proj, onednn=use_onednn),
                o=_bind_linear(layer.self_attn.o_proj, onednn=use_onednn),
                post_norm=layer.post_attention_layernorm,
                gate=_bind_linear(layer.mlp.gate_proj, onednn=use_onednn),
                up=_bind_linear(layer.mlp.up_proj, onednn=use_onednn),
                down=_bind_linear(layer.mlp.down_proj, onednn=use_onednn),
                act=layer.mlp.act_fn,
            )
            for layer in self._layers
        ]
        self._lm_head_linear = _bind_linear(self._lm_head, onednn=use_onednn)

        self.info = ModelInfo(
            name=name or getattr(config, "_name_or_path", "") or str(model_type),
            vocab_size=int(config.vocab_size),
            num_layers=len(self._layers),
            hidden_size=int(config.hidden_size),
            eos_token_ids=_eos_token_ids(hf_model),
            max_positions=max_positions,
        )

    def __repr__(self) -> str:
        info = self.info
        return f"TorchCausalLM({info.name!r}, dtype={self._dtype}, layers={info.num_layers})"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the model's weight dtype)."""
        return self._dtype

    # -- states ---------------------------------------------------------------------------

    def new_state(self) -> TorchKVState:
        """Return an empty cache for a new sequence (allocates nothing until a layer runs)."""
        return TorchKVState(
            owner=self,
            owner_name=self.info.name,
            num_layers=self.info.num_layers,
            num_kv_heads=self._num_kv_heads,
            head_dim=self._head_dim,
            dtype=self._dtype,
            device=self._device,
            max_positions=self.info.max_positions,
        )

    def _own(self, state: KVState) -> TorchKVState:
        """`state` as ours, or `RuntimeStateError` (another backend, another model, released)."""
        if not isinstance(state, TorchKVState):
            raise RuntimeStateError(
                f"model {self.info.name!r} needs a state from its own new_state(), "
                f"got {type(state).__name__}"
            )
        state._check_owner(self, self.info.name)
        return state

    def truncate(self, state: KVState, length: int) -> None:
        """Roll `state` back to its first `length` positions in O(1) (nothing is freed).

        Raises:
            RuntimeStateError: wrong/released state, or `length` negative or beyond its length.
        """
        self._own(state)._truncate(length)

    def fork(self, state: KVState) -> TorchKVState:
        """Return an independent copy of `state` (the held positions are copied)."""
        with torch.inference_mode():
            return self._own(state)._fork()

    def release(self, state: KVState) -> None:
        """Free the cache memory; any later use of `state` raises `RuntimeStateError`."""
        if isinstance(state, TorchKVState) and state.released:
            return  # releasing twice is harmless
        self._own(state)._release()

    # -- the model pieces ---------------------------------------------------------------

    def _token_tensor(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1:
            raise ConfigurationError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
            raise ConfigurationError(
                f"token ids must be in [0, {self.info.vocab_size}) for model {self.info.name!r}, "
                f"got values from {int(ids.min())} to {int(ids.max())}"
            )
        return ids.to(self._device)

    # Compute runs under inference_mode (no autograd bookkeeping at all), but a tensor made
    # there may never be modified in place outside it ("Inplace update to inference tensor").
    # So what we hand back is copied outside it: callers may then scale logits in place.
    # The copy is tiny next to the matmuls (one vocab row per token).

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Token embeddings, [n, hidden_size] in the model dtype.

        Raises:
            ConfigurationError: ids not 1-D or outside [0, vocab_size).
        """
        with torch.inference_mode():
            out: torch.Tensor = self._embed_tokens(self._token_tensor(token_ids))
        return out.clone()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [n, hidden_size] -> [n, vocab_size] float32 logits on the CPU."""
        with torch.inference_mode():
            logits = self._lm_head_linear(self._norm(self._check_hidden(hidden)))
        return logits.to(device="cpu", dtype=torch.float32, copy=True)

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 2 or hidden.shape[1] != self.info.hidden_size:
            raise ConfigurationError(
                f"hidden states must be [n, {self.info.hidden_size}], got {tuple(hidden.shape)}"
            )
        # Activations may arrive over the wire in another dtype; compute in ours.
        return hidden.to(device=self._device, dtype=self._dtype)

    def run_layers(
        self, state: KVState, hidden: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Run decoder layers [start, stop) on `hidden` [n, hidden_size] for the next n positions.

        Positions continue from what `state` holds at layer `start`; layers [start, stop)
        must all hold that many. A state may serve only a suffix [k, L) of the layers.

        Returns:
            [n, hidden_size] in the model dtype.

        Raises:
            ConfigurationError: bad layer range or hidden shape.
            RuntimeStateError: wrong/released state, layers of the range out of step,
                or `max_positions` would be exceeded. The state is unchanged.
        """
        if not 0 <= start <= stop <= self.info.num_layers:
            raise ConfigurationError(
                f"layer range [{start}, {stop}) is not within [0, {self.info.num_layers})"
            )
        own = self._own(state)
        with torch.inference_mode():
            hidden = self._check_hidden(hidden)
            out = self._forward([own], hidden, [hidden.shape[0]], start, stop)
        return out.clone()

    def extend(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        """Append `token_ids` to the sequence; return [len(token_ids), vocab_size] float32 logits.

        Raises:
            RuntimeStateError: wrong/released state or `max_positions` exceeded (state unchanged).
            ConfigurationError: token ids out of range.
        """
        return self.extend_batch([state], [token_ids])[0]

    def extend_batch(
        self, states: Sequence[KVState], token_ids: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Extend several sequences in one ragged forward pass; one logits tensor per sequence.

        The new tokens of every sequence (any number each, zero included) go through the
        projections and MLPs together; attention runs per sequence over its own cache.
        Equal to `extend` on each in turn, within float tolerance.

        Raises:
            RuntimeStateError: a state is wrong/released/repeated, or would exceed
                `max_positions`; no state is changed.
            ConfigurationError: token ids out of range, or lengths of the arguments differ.
        """
        if len(states) != len(token_ids):
            raise ConfigurationError(
                f"extend_batch got {len(states)} states but {len(token_ids)} token lists"
            )
        owned = [self._own(s) for s in states]
        if len({id(s) for s in owned}) != len(owned):
            raise RuntimeStateError("extend_batch got the same state twice; fork() it first")
        ids = [self._token_tensor(t) for t in token_ids]
        seq_lens = [int(t.shape[0]) for t in ids]
        if sum(seq_lens) == 0:
            for s in owned:  # still validate, so misuse does not pass silently
                s._start_length(0, self.info.num_layers, 0)
            return [torch.empty(0, self.info.vocab_size) for _ in owned]
        with torch.inference_mode():
            hidden = self._embed_tokens(torch.cat(ids))  # [N, H]
            hidden = self._forward(owned, hidden, seq_lens, 0, self.info.num_layers)
            logits = self._lm_head_linear(self._norm(hidden))  # [N, vocab], model dtype
        return list(logits.to(device="cpu", dtype=torch.float32, copy=True).split(seq_lens))

    # -- the forward pass -----------------------------------------------------------------

    def _forward(
        self,
        states: list[TorchKVState],
        hidden: torch.Tensor,
        seq_lens: list[int],
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Layers [start, stop) over the ragged batch `hidden` [N, H], N = sum(seq_lens)."""
        total = hidden.shape[0]
        assert total == sum(seq_lens) and hidden.shape[1] == self.info.hidden_size
        # All checks happen before the first write, so a failure leaves every state intact.
        pasts = [s._start_length(start, stop, n) for s, n in zip(states, seq_lens, strict=True)]
        if total == 0 or start == stop:
            return hidden
        device = self._device
        n_heads, n_kv, d = self._num_heads, self._num_kv_heads, self._head_dim

        # Positions of the new tokens, sequence after sequence: [N].
        positions = torch.cat(
            [torch.arange(p, p + n, device=device) for p, n in zip(pasts, seq_lens)]
        )
        cos, sin = self._rotary_emb(hidden, positions[None])  # each [1, N, D]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, D], broadcast over heads

        # Causal masks with an offset, one per sequence, shared by all layers: new token t
        # (at position past + t) sees cached+new keys 0..past+t, i.e. an [n, L] boolean mask.
        # One new token sees everything (no mask); a prefill from empty (past == 0) is plain
        # top-left causal, which SDPA does itself without materialising the mask.
        masks: list[torch.Tensor | None] = []
        for past, n in zip(pasts, seq_lens):
            if n <= 1 or past == 0:
                masks.append(None)
                continue
            key_pos = torch.arange(past + n, device=device)  # [L]
            query_pos = torch.arange(past, past + n, device=device)  # [n]
            masks.append(key_pos[None, :] <= query_pos[:, None])  # [n, L]

        for layer_index in range(start, stop):
            ops = self._ops[layer_index]
            x = ops.input_norm(hidden)  # [N, H]
            q = ops.q(x).view(total, n_heads, d)  # [N, Hq, D]
            k = ops.k(x).view(total, n_kv, d)  # [N, Hkv, D]
            v = ops.v(x).view(total, n_kv, d)  # [N, Hkv, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin

            outputs: list[torch.Tensor] = []
            offset = 0
            for state, n, mask in zip(states, seq_lens, masks):
                if n == 0:
                    continue
                rows = slice(offset, offset + n)
                offset += n
                keys, values = state._append(
                    layer_index, k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                )  # each [Hkv, L, D], L = past + n
                outputs.append(self._attend(q[rows], keys, values, mask))
            attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [N, Hq*D]
            hidden = hidden + ops.o(attended)
            x = ops.post_norm(hidden)  # [N, H]
            hidden = hidden + ops.down(ops.act(ops.gate(x)) * ops.up(x))  # gated MLP (SwiGLU)
        return hidden

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of one sequence's n new queries over its L cached+new keys.

        Args:
            q: [n, Hq, D], rotated.
            keys, values: [Hkv, L, D], views into the cache.
            mask: [n, L] boolean (True = may attend), or None: no mask for n == 1,
                top-left causal for n > 1 (then n == L).

        Returns:
            [n, Hq * D].
        """
        n, n_heads, d = q.shape
        n_kv, g = self._num_kv_heads, self._groups
        # 4-D throughout: torch's CPU flash kernel takes [B, H, T, D]; 3-D inputs fall back
        # to the math path, 2-4x slower here (and far worse with a single kv head).
        if n == 1:
            # Decode. GQA without copying the cache: query head h uses kv head h // g, so view
            # the g query heads of each kv head as g query rows ([Hkv, g, D]) and attend each kv
            # head once. (enable_gqa / HF's repeat_kv copy K and V g times per layer and step.)
            q_folded = q.view(n_kv, g, d)[None]  # [1, Hkv, g, D]
            out = F.scaled_dot_product_attention(
                q_folded, keys[None], values[None], scale=self._scaling
            )  # [1, Hkv, g, D]
            return out.reshape(1, n_heads * d)
        # Several new tokens (prefill, draft blocks): here the query work dominates and SDPA's
        # own GQA path measured fastest (2x the folded form on a 500-token prefill).
        assert mask is not None or n == keys.shape[1], "n > 1 without a mask must be a prefill"
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, Hq, n, D]
            keys[None],  # [1, Hkv, L, D]
            values[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self._scaling,
            enable_gqa=True,
        )  # [1, Hq, n, D]
        return out[0].transpose(0, 1).reshape(n, n_heads * d)

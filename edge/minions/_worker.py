"""The edge model's side of Minion and MinionS: prompts as segments, a prefix cache, batched decoding.

What belongs here: turning chat messages into token segments whose boundaries are stable,
a longest-prefix KV cache (a document or chunk is prefilled once and forked for every job
and question over it), and greedy decoding of many prompts at once with the runtime's
batched decoder (`tether.runtime.greedy_decode`, JSON constraints as its `choose` hook).
All of it is blocking and runs on the edge model's thread.
What does not: what the prompts say (`_minion.py`, `_minions.py`) or any networking.

The same class serves any `CausalLM`; the benchmark uses it for the cloud-only and
edge-only baselines too, so every method decodes the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tether.errors import ConfigurationError
from tether.runtime import CausalLM, KVState, greedy_decode

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def render_segments(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    assistant_prefill: str = "",
) -> list[str]:
    """The chat-templated prompt as text segments split where each message's parts meet.

    A message's ``content`` may be a string or a list of strings (parts). The template is
    rendered once with sentinels between parts and cut there, so encoding each segment on
    its own and concatenating gives ids whose prefixes are shared by every prompt with the
    same leading parts (the prefix cache relies on this). Put part boundaries after a
    newline and start the next part with a non-blank character: then the split encoding
    equals the joint one for Qwen-style byte-level BPE.

    Args:
        tokenizer: has ``apply_chat_template``; without a chat template, parts are joined
            as ``role: content`` lines.
        messages: OpenAI-style messages.
        assistant_prefill: text the assistant's reply is forced to start with.

    Returns:
        The segments; ``"".join(segments)`` is the full prompt text.
    """
    rendered: list[dict[str, str]] = []
    parts: list[str] = []
    for m in messages:
        content = m["content"]
        pieces = [content] if isinstance(content, str) else list(content)
        text = ""
        for i, piece in enumerate(pieces):
            if i:
                text += _SENTINEL.format(len(parts))
                parts.append("")
            text += piece.replace("\ue000", " ").replace("\ue001", " ")  # keep the cuts ours
        rendered.append({"role": str(m["role"]), "content": text})
    if getattr(tokenizer, "chat_template", None):
        full = str(tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True))
    else:
        full = "".join(f"{m['role']}: {m['content']}\n" for m in rendered) + "assistant: "
    full += assistant_prefill
    return [s for s in _SENTINEL_RE.split(full)[::2]]


def encode_segments(tokenizer: Any, segments: Sequence[str]) -> list[int]:
    """Concatenated ids of each segment encoded on its own (no special tokens added)."""
    ids: list[int] = []
    for seg in segments:
        if seg:
            ids.extend(int(t) for t in tokenizer.encode(seg, add_special_tokens=False))
    return ids


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgePrompt:
    """One prompt for the batch generator.

    Attributes:
        prefix: the shareable leading ids (system prompt + document or chunk); its KV
            state is cached and forked.
        suffix: the ids that follow (the question or job, and any forced reply start).
        max_new_tokens: the most tokens to generate.
        json_prefix: when not None, decoding is constrained to a JSON object whose text
            starts with this string (which must already be the end of `suffix`).
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_new_tokens: int
    json_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.prefix and not self.suffix:
            raise ConfigurationError("an edge prompt needs at least one token")


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeOutput:
    """One generated reply.

    Attributes:
        text: the decoded reply (for JSON prompts: the `json_prefix` plus the generated text).
        completion_tokens: tokens generated.
        prompt_tokens: tokens of the prompt (prefix + suffix).
        prefilled_tokens: prompt tokens this call actually ran through the model (the
            rest came from the prefix cache).
        finish_reason: ``"stop"`` (end of sequence, or the JSON object closed) or ``"length"``.
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    prefilled_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass(slots=True)
class _Entry:
    ids: tuple[int, ...]
    state: KVState
    last_logits: torch.Tensor  # [vocab], the prediction after ids[-1]
    used: float = field(default_factory=time.monotonic)


class BatchGenerator:
    """Greedy decoding of many prompts at once, with a longest-prefix KV cache.

    Blocking; call it from one thread (the edge model's). Prefixes are prefilled in
    `prefill_chunk`-token pieces; the cache keeps at most `cache_tokens` positions, evicting
    the least recently used prefixes.

    Args:
        model: any `CausalLM`.
        tokenizer: its tokenizer (decodes replies; drives the JSON constraint).
        eos_ids: ids that end a reply.
        max_batch: most sequences decoded together.
        prefill_chunk: most tokens per forward while prefilling a prefix.
        cache_tokens: positions the prefix cache may hold (0 disables it).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int],
        max_batch: int = 16,
        prefill_chunk: int = 512,
        cache_tokens: int = 65_536,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1 or cache_tokens < 0:
            raise ConfigurationError("max_batch and prefill_chunk must be >= 1, cache_tokens >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache_tokens = cache_tokens
        self._cache: list[_Entry] = []
        self.forward_passes = 0
        self.compute_s = 0.0

    # -- the prefix cache -------------------------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        return sum(len(e.ids) for e in self._cache)

    def clear(self) -> None:
        """Release every cached prefix."""
        for e in self._cache:
            self.model.release(e.state)
        self._cache.clear()

    def _lookup(self, ids: tuple[int, ...]) -> _Entry | None:
        best: _Entry | None = None
        for e in self._cache:
            n = len(e.ids)
            if n <= len(ids) and (best is None or n > len(best.ids)) and ids[:n] == e.ids:
                best = e
        return best

    def _extend(self, state: KVState, ids: Sequence[int]) -> torch.Tensor:
        """Extend in chunks; return the last logits row ([vocab])."""
        last: torch.Tensor | None = None
        for pos in range(0, len(ids), self.prefill_chunk):
            t0 = time.perf_counter()
            logits = self.model.extend(state, ids[pos : pos + self.prefill_chunk])
            self.compute_s += time.perf_counter() - t0
            self.forward_passes += 1
            last = logits[-1].clone()  # not a view: it would keep the [n, vocab] block alive
        assert last is not None
        return last

    def _prefix_state(self, ids: tuple[int, ...]) -> tuple[_Entry, int]:
        """A cache entry holding exactly `ids` (made now if needed), and the tokens prefilled."""
        hit = self._lookup(ids)
        if hit is not None and len(hit.ids) == len(ids):
            hit.used = time.monotonic()
            return hit, 0
        state = self.model.fork(hit.state) if hit is not None else self.model.new_state()
        rest = ids[len(hit.ids) :] if hit is not None else ids
        try:
            last = self._extend(state, rest)
        except BaseException:
            self.model.release(state)
            raise
        entry = _Entry(ids=ids, state=state, last_logits=last)
        if self.cache_tokens:
            self._cache.append(entry)
            self._evict(keep=entry)
        return entry, len(rest)

    def _evict(self, keep: _Entry) -> None:
        while self.cached_tokens > self.cache_tokens and len(self._cache) > 1:
            victim = min((e for e in self._cache if e is not keep), key=lambda e: e.used)
            self._cache.remove(victim)
            self.model.release(victim.state)

    def prefixes(self) -> list[tuple[tuple[int, ...], KVState, torch.Tensor]]:
        """The cached prefixes as (ids, state, last logits), most recently used last (read-only)."""
        return [(e.ids, e.state, e.last_logits) for e in sorted(self._cache, key=lambda e: e.used)]

    def add_prefix(self, ids: Sequence[int], state: KVState, last_logits: torch.Tensor) -> None:
        """Cache a prefix prefilled elsewhere (e.g. restored from disk); the cache owns `state` now.

        Args:
            ids: the tokens `state` holds.
            state: a state of this generator's model holding exactly `ids`.
            last_logits: [vocab], the model's prediction after the last of `ids`.
        """
        if state.length != len(ids):
            raise ConfigurationError(f"the state holds {state.length} positions, not the {len(ids)} ids given")
        entry = _Entry(ids=tuple(int(i) for i in ids), state=state, last_logits=last_logits.clone())
        self._cache.append(entry)
        self._evict(keep=entry)

    def warm(self, prefixes: Sequence[Sequence[int]]) -> int:
        """Prefill (and cache) prefixes ahead of time; returns the tokens prefilled."""
        total = 0
        for p in prefixes:
            entry, n = self._prefix_state(tuple(p))
            total += n
            if not self.cache_tokens:
                self.model.release(entry.state)
        return total

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[EdgePrompt]) -> list[EdgeOutput]:
        """Greedy replies to every prompt, in order, decoding up to `max_batch` at a time.

        Raises:
            RuntimeStateError: a prompt does not fit the model's `max_positions`.
        """
        # Group prompts that share a prefix so a prefix is forked while it is hot.
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i].prefix, i))
        results: dict[int, EdgeOutput] = {}
        for start in range(0, len(order), self.max_batch):
            batch = order[start : start + self.max_batch]
            for i, res in zip(batch, self._generate_batch([prompts[i] for i in batch]), strict=True):
                results[i] = res
        return [results[i] for i in range(len(prompts))]

    def _generate_batch(self, prompts: Sequence[EdgePrompt]) -> list[EdgeOutput]:
        from tether.contract import SamplingParams
        from tether.jsonmode import JsonConstraint

        limit = self.model.info.max_positions
        for p in prompts:
            need = len(p.prefix) + len(p.suffix) + p.max_new_tokens
            if need > limit:
                from tether.errors import RuntimeStateError

                raise RuntimeStateError(
                    f"an edge prompt of {len(p.prefix) + len(p.suffix)} tokens plus {p.max_new_tokens} "
                    f"new tokens exceeds the model's {limit} positions; use smaller chunks"
                )
        states: list[KVState] = []
        prefilled: list[int] = []
        first: list[torch.Tensor | None] = []
        try:
            for p in prompts:
                if p.prefix:
                    entry, n = self._prefix_state(p.prefix)
                    states.append(self.model.fork(entry.state) if self.cache_tokens else entry.state)
                    first.append(entry.last_logits)
                else:
                    states.append(self.model.new_state())
                    first.append(None)
                    n = 0
                prefilled.append(n + len(p.suffix))
            with_suffix = [i for i, p in enumerate(prompts) if p.suffix]
            if with_suffix:
                t0 = time.perf_counter()
                rows = self.model.extend_batch([states[i] for i in with_suffix],
                                               [list(prompts[i].suffix) for i in with_suffix])
                self.compute_s += time.perf_counter() - t0
                self.forward_passes += 1
                for i, r in zip(with_suffix, rows, strict=True):
                    first[i] = r[-1]
            greedy = SamplingParams()
            gen = torch.Generator()
            constraints: list[Any] = []
            for p in prompts:
                if p.json_prefix is None:
                    constraints.append(None)
                    continue
                c = JsonConstraint(self.tokenizer, self.model.info.vocab_size)
                if p.json_prefix and not c.prefix.feed_text(p.json_prefix):
                    raise ConfigurationError(f"json_prefix {p.json_prefix!r} does not start a JSON object")
                constraints.append(c)
            eos = set(self.eos_ids)

            def choose(i: int, row: torch.Tensor, remaining: int) -> int:
                c = constraints[i]
                if c is None:
                    return int(row.argmax())
                return int(c.choose(row, greedy, gen, eos_ids=eos, remaining=remaining))

            def count(seconds: float) -> None:
                self.compute_s += seconds
                self.forward_passes += 1

            first_rows = [row for row in first if row is not None]
            assert len(first_rows) == len(prompts), "every prompt has a prefix or a suffix"
            decoded = greedy_decode(
                self.model, states, first_rows, max_new_tokens=[p.max_new_tokens for p in prompts],
                stop_ids=self.eos_ids, choose=choose,
                is_done=lambda i, _: constraints[i] is not None and constraints[i].complete, on_forward=count,
            )
        finally:
            for s in states:  # forks (or uncached prefix states): never the cached entries
                self.model.release(s)
        outputs: list[EdgeOutput] = []
        for p, d, n in zip(prompts, decoded, prefilled, strict=True):
            text = self.tokenizer.decode(list(d.token_ids), skip_special_tokens=True)
            if p.json_prefix:
                text = p.json_prefix + text
            outputs.append(EdgeOutput(
                text=text, completion_tokens=len(d.token_ids), prompt_tokens=len(p.prefix) + len(p.suffix),
                prefilled_tokens=n, finish_reason=d.finish_reason,
            ))
        return outputs

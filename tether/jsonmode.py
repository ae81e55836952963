"""JSON mode for chat: constrain generation so the reply is a single JSON object.

What belongs here: an incremental JSON prefix checker (a small pushdown automaton over
characters) and the token chooser that only lets through tokens keeping the text a valid
prefix. What does not: the decoding loops (the cloud's `SessionManager.chat`, the edge's
Minion workers): both use this one module, which is why it lives in the shared kernel.

At each step the most likely `candidates` tokens are tried in order (greedy takes the first
valid; sampling renormalises over the valid ones); end-of-sequence is allowed only once the
object is complete, and generation stops as soon as it is.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from tether.contract import SamplingParams
from tether.sampling import warp

__all__ = ["JsonConstraint", "JsonPrefix"]

_WS = " \t\n\r"
_MAX_WS_RUN = 24  # consecutive whitespace allowed, so a model cannot loop on blanks


class _S(enum.IntEnum):
    VALUE = 0  # expecting a value
    OBJ_FIRST = 1  # after '{': a key or '}'
    OBJ_KEY = 2  # after ',' in an object: a key
    COLON = 3
    OBJ_NEXT = 4  # after a member: ',' or '}'
    ARR_FIRST = 5  # after '[': a value or ']'
    ARR_NEXT = 6  # after an element: ',' or ']'
    STRING = 7
    ESCAPE = 8
    UNICODE = 9
    NUMBER = 10
    LITERAL = 11
    DONE = 12


# After a member or an element: (separator, state after the separator, closing bracket).
_AFTER_ITEM = {_S.OBJ_NEXT: (",", _S.OBJ_KEY, "}"), _S.ARR_NEXT: (",", _S.VALUE, "]")}


class JsonPrefix:
    """Accepts characters while they form a prefix of one JSON object; `complete` once closed."""

    __slots__ = ("stack", "state", "is_key", "num", "lit", "hex_left", "ws_run", "started")

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.state = _S.VALUE
        self.is_key = False
        self.num = ""
        self.lit = ""
        self.hex_left = 0
        self.ws_run = 0
        self.started = False

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack = list(self.stack)
        c.state, c.is_key, c.num, c.lit = self.state, self.is_key, self.num, self.lit
        c.hex_left, c.ws_run, c.started = self.hex_left, self.ws_run, self.started
        return c

    @property
    def complete(self) -> bool:
        return self.state == _S.DONE

    def feed_text(self, text: str) -> bool:
        return all(self.feed(ch) for ch in text)

    def _after_value(self) -> None:
        if not self.stack:
            self.state = _S.DONE
        else:
            self.state = _S.OBJ_NEXT if self.stack[-1] == "{" else _S.ARR_NEXT

    def _close_container(self) -> None:
        self.stack.pop()
        self._after_value()

    def feed(self, ch: str) -> bool:  # noqa: C901 - one branch per automaton state
        st = self.state
        if st == _S.STRING:
            if ch == '"':
                if self.is_key:
                    self.state = _S.COLON
                else:
                    self._after_value()
                return True
            if ch == "\\":
                self.state = _S.ESCAPE
                return True
            return ch >= " "  # control characters must be escaped
        if st == _S.ESCAPE:
            if ch == "u":
                self.state, self.hex_left = _S.UNICODE, 4
                return True
            if ch in '"\\/bfnrt':
                self.state = _S.STRING
                return True
            return False
        if st == _S.UNICODE:
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.hex_left -= 1
            if self.hex_left == 0:
                self.state = _S.STRING
            return True
        if st == _S.NUMBER:
            candidate = self.num + ch
            if ch in "0123456789+-.eE" and _number_prefix_ok(candidate):
                self.num = candidate
                return True
            if not _number_complete(self.num):
                return False
            self._after_value()
            return self.feed(ch)
        if st == _S.LITERAL:
            if self.lit and ch == self.lit[0]:
                self.lit = self.lit[1:]
                if not self.lit:
                    self._after_value()
                return True
            return False
        if st == _S.DONE:
            return False
        if ch in _WS:
            if not self.started:
                return False  # the reply starts with '{'
            self.ws_run += 1
            return self.ws_run <= _MAX_WS_RUN
        self.ws_run = 0
        if st == _S.VALUE or st == _S.ARR_FIRST:
            if st == _S.ARR_FIRST and ch == "]":
                self._close_container()
                return True
            if not self.started:
                if ch != "{":
                    return False
                self.started = True
            return self._start_value(ch)
        if st in (_S.OBJ_FIRST, _S.OBJ_KEY):
            if ch == '"':
                self.state, self.is_key = _S.STRING, True
                return True
            if ch == "}" and st == _S.OBJ_FIRST:
                self._close_container()
                return True
            return False
        if st == _S.COLON:
            if ch == ":":
                self.state = _S.VALUE
                return True
            return False
        if st in _AFTER_ITEM:
            separator, after_separator, closer = _AFTER_ITEM[st]
            if ch == separator:
                self.state = after_separator
                return True
            if ch == closer:
                self._close_container()
                return True
            return False
        return False

    def closing_char(self) -> str:
        """The next character on the shortest way to a complete object."""
        st = self.state
        if st == _S.STRING:
            return '"'
        if st == _S.ESCAPE:
            return "n"
        if st == _S.UNICODE:
            return "0"
        if st == _S.NUMBER:
            if not _number_complete(self.num):
                return "0"
            return "}" if self.stack and self.stack[-1] == "{" else "]"
        if st == _S.LITERAL:
            return self.lit[0]
        if st == _S.VALUE:
            return "{" if not self.started else "0"
        if st in (_S.OBJ_FIRST, _S.OBJ_NEXT):
            return "}"
        if st == _S.OBJ_KEY:
            return '"'
        if st == _S.COLON:
            return ":"
        if st in (_S.ARR_FIRST, _S.ARR_NEXT):
            return "]"
        return ""

    def closing_text(self) -> str:
        """The shortest text that completes the object from here."""
        c = self.copy()
        out = []
        while not c.complete:
            ch = c.closing_char()
            if not ch or not c.feed(ch):
                break
            out.append(ch)
        return "".join(out)

    def _start_value(self, ch: str) -> bool:
        if ch == "{":
            self.stack.append("{")
            self.state = _S.OBJ_FIRST
        elif ch == "[":
            self.stack.append("[")
            self.state = _S.ARR_FIRST
        elif ch == '"':
            self.state, self.is_key = _S.STRING, False
        elif ch in "-0123456789":
            self.state, self.num = _S.NUMBER, ch
        elif ch in "tfn":
            self.state = _S.LITERAL
            self.lit = {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True


def _number_prefix_ok(s: str) -> bool:
    """Whether `s` can still grow into a JSON number."""
    i, n = 0, len(s)
    if i < n and s[i] == "-":
        i += 1
    if i == n:
        return True
    if s[i] == "0":
        i += 1
    elif s[i].isdigit():
        while i < n and s[i].isdigit():
            i += 1
    else:
        return False
    if i < n and s[i] == ".":
        after = _digit_run(s, i + 1)
        if after is None:
            return False
        i = after
    if i < n and s[i] in "eE":
        i += 1
        if i < n and s[i] in "+-":
            i += 1
        after = _digit_run(s, i)
        if after is None:
            return False
        i = after
    return i == n


def _digit_run(s: str, i: int) -> int | None:
    """Past the digits that must follow a '.' or an exponent (from `i`): their end, ``len(s)``
    when `s` stops first (still a prefix), None when a non-digit comes first."""
    if i < len(s) and not s[i].isdigit():
        return None
    while i < len(s) and s[i].isdigit():
        i += 1
    return i


def _number_complete(s: str) -> bool:
    return _number_prefix_ok(s) and s[-1:].isdigit()


class JsonConstraint:
    """Chooses tokens that keep the generated text a valid JSON object prefix.

    Args:
        tokenizer: decodes single token ids to text (results are cached).
        vocab_size: the model's vocabulary size.
        candidates: how many of the most likely tokens are tried per step.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, candidates: int = 256) -> None:
        self._tok = tokenizer
        self._vocab = vocab_size
        self._candidates = candidates
        self._text_cache: dict[int, str] = {}
        # Special tokens (eos among them) never appear inside the JSON text.
        self._banned = {int(t) for t in getattr(tokenizer, "all_special_ids", ())}
        self.prefix = JsonPrefix()

    @property
    def complete(self) -> bool:
        return self.prefix.complete

    def _text(self, token: int) -> str:
        t = self._text_cache.get(token)
        if t is None:
            t = self._tok.decode([token], skip_special_tokens=False)
            self._text_cache[token] = t
        return t

    def _advance(self, token: int) -> JsonPrefix | None:
        if token in self._banned:
            return None
        text = self._text(token)
        if not text or "\ufffd" in text:
            return None  # partial UTF-8 pieces or special tokens with no text
        nxt = self.prefix.copy()
        return nxt if nxt.feed_text(text) else None

    def choose(self, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator,
               *, eos_ids: set[int], remaining: int | None = None) -> int:
        """The next token: most likely (or sampled) among those that keep the JSON valid.

        When only `remaining` tokens are left and closing the object needs about that many,
        the object is closed instead, so the reply is valid JSON even when cut short.
        """
        if self.prefix.complete:
            return min(eos_ids) if eos_ids else int(logits.argmax())
        self._banned |= eos_ids
        if remaining is not None and remaining <= len(self.prefix.closing_text()) + 1:
            return self._force()
        k = min(self._candidates, logits.shape[-1])
        if sampling.greedy:
            order = torch.topk(logits, k).indices.tolist()
            for tok in order:
                nxt = self._advance(int(tok))
                if nxt is not None:
                    self.prefix = nxt
                    return int(tok)
        else:
            # The target's warping (temperature, top-k, top-p), in float64 like the acceptance rule.
            probs = warp(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                         dtype=torch.float64)
            vals, idx = torch.topk(probs, k)
            valid: list[tuple[int, float, JsonPrefix]] = []
            for tok, p in zip(idx.tolist(), vals.tolist(), strict=True):
                if p <= 0:
                    break
                nxt = self._advance(int(tok))
                if nxt is not None:
                    valid.append((int(tok), p, nxt))
            if valid:
                w = torch.tensor([v[1] for v in valid], dtype=torch.float64)
                j = int(torch.multinomial(w / w.sum(), 1, generator=generator))
                self.prefix = valid[j][2]
                return valid[j][0]
        # Nothing among the candidates fits: force the cheapest structural close.
        return self._force()

    def _force(self) -> int:
        """The token of the next closing character (see `JsonPrefix.closing_char`)."""
        for text in (self.prefix.closing_char(), "}", "]", '"', "0"):
            if not text:
                continue
            ids = self._tok.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                nxt = self._advance(ids[0])
                if nxt is not None:
                    self.prefix = nxt
                    return int(ids[0])
        raise RuntimeError("json mode: no token can continue the JSON text")

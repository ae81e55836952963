"""The verbatim filter: no span of more than N consecutive document characters leaves the device.

What belongs here: `VerbatimFilter`, which every message of a Minion / MinionS session passes
through before it joins the cloud conversation (`Session.add` in `_types.py`, the one door).
What does not: what the messages say or which fields they have (the protocol cores).

How it works. Text is compared in a normal form, the same for the documents and for what
is sent: JSON escapes of whitespace, quotes and backslashes undone (results travel as JSON
lines), NFKC, case-folded, every whitespace run one space. The documents are hashed once
(a polynomial hash over the code points, vectorised with numpy) in two sorted arrays:
every window of N + 1 characters, and every window of ``g`` characters (a gram; ``g =
min(N + 1, 8)``) with its position. In an outgoing message, any window of N + 1 document
characters is withheld (the rule, exactly, within one message). Then each gram is placed
(binary search, then an exact string comparison, so hash collisions cost nothing), and the
document positions it covers are marked *revealed* for the rest of the session. A gram
whose marking would make a run of revealed document characters longer than N is withheld:
its characters are replaced by ``[…]``, and its positions count as revealed all the same,
so the rest of a long copy is withheld too. Because the marks persist, pieces sent in
different messages or rounds cannot be chained past N characters either ("spell it out in
pieces" is cut where a piece touches what was already revealed).

Text the cloud already has is exempt: the task and the fixed prompts, and every reply the
planner wrote (`learn`). Withholding those would turn the filter into an oracle: the planner
could write a guess, and see it cut when it is in the document.

What it does not stop (docs/minions.md says so too): text the edge model transforms (spelled
out letter by letter, translated, paraphrased, with characters inserted), and, across
messages, pieces shorter than ``g`` characters, pieces with gaps between them, and grams
that occur more than `MAX_OCCURRENCES` times in the documents (boilerplate, too common to
place; the within-message rule still covers them).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from tether.errors import ConfigurationError

MARKER = "[…]"
TRACKED_GRAM = 8
MAX_OCCURRENCES = 64

_BASE = np.uint64(1_000_003)
_ESCAPE = re.compile(r'\\([ntr"\\/])')
_UNESCAPED = {"n": " ", "t": " ", "r": " ", '"': '"', "\\": "\\", "/": "/"}
_SPACE = re.compile(r"\s+")
_CUT = re.compile(rb"\x01+")


@lru_cache(maxsize=4096)
def _fold(ch: str) -> str:
    return unicodedata.normalize("NFKC", ch).casefold()


def normal_form(text: str) -> str:
    """``normalise(text)[0]`` without the spans, at C speed (for the documents)."""
    text = _ESCAPE.sub(lambda m: _UNESCAPED[m.group(1)], text)
    text = text.lower() if text.isascii() else "".join(map(_fold, text))
    return _SPACE.sub(" ", text)


def normalise(text: str) -> tuple[str, list[int], list[int]]:
    """The comparison form of `text`, and for each of its characters the span it came from.

    Returns:
        (normal, start, end): ``normal[k]`` stands for ``text[start[k]:end[k]]``.
    """
    # 1. JSON escapes: one character standing for two.
    joined, start, end = _collapse(text, list(range(len(text))), list(range(1, len(text) + 1)), _ESCAPE,
                                   lambda m: _UNESCAPED[m.group(1)])
    # 2. NFKC and case folding, a character at a time (one may become several).
    if joined.isascii():
        folded, fstart, fend = joined.lower(), start, end
    else:
        out: list[str] = []
        fstart, fend = [], []
        for ch, s, e in zip(joined, start, end, strict=True):
            f = _fold(ch)
            out.append(f)
            fstart.extend([s] * len(f))
            fend.extend([e] * len(f))
        folded = "".join(out)
    # 3. Whitespace runs become one space.
    return _collapse(folded, fstart, fend, _SPACE, lambda m: " ")


def _collapse(
    text: str, start: list[int], end: list[int], pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str]
) -> tuple[str, list[int], list[int]]:
    """`text` with each (non-empty) match of `pattern` replaced by the one character
    `replace(match)`, and the span maps carried along: ``text[k]`` came from
    ``start[k]:end[k]``, and a replacement spans its whole match."""
    out: list[str] = []
    ostart: list[int] = []
    oend: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        out.append(text[pos : m.start()])
        ostart.extend(start[pos : m.start()])
        oend.extend(end[pos : m.start()])
        out.append(replace(m))
        ostart.append(start[m.start()])
        oend.append(end[m.end() - 1])
        pos = m.end()
    out.append(text[pos:])
    ostart.extend(start[pos:])
    oend.extend(end[pos:])
    return "".join(out), ostart, oend


def gram_hashes(text: str, g: int) -> npt.NDArray[np.uint64]:
    """[len(text) - g + 1] uint64: a polynomial hash of each g-character window (wraps mod 2**64)."""
    n = len(text) - g + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for k in range(g):  # g vectorised passes, in place, instead of a Python loop over the text
        h *= _BASE
        h += codes[k : k + n]
    return h


class VerbatimFilter:
    """Withholds every span of more than `max_chars` consecutive document characters from the cloud.

    One filter serves one `ask` session: what it has let through is remembered, so later
    messages cannot extend an earlier piece past the limit.

    Args:
        documents: the private documents.
        max_chars: the longest run of consecutive document characters that may leave (N).

    Raises:
        ConfigurationError: `max_chars` is below 1.
    """

    def __init__(self, documents: Sequence[str], max_chars: int) -> None:
        if max_chars < 1:
            raise ConfigurationError(f"max_verbatim_chars must be >= 1 (or None to turn the filter off), "
                                     f"got {max_chars}")
        self.max_chars = max_chars
        self.gram = min(max_chars + 1, TRACKED_GRAM)
        # The documents joined with a NUL between them: NUL never survives into a message
        # (control characters are stripped from edge text), so no gram spans two documents.
        self._doc = "\x00".join(normal_form(d).replace("\x00", " ") for d in documents)
        # Every window of N + 1 characters: a message holding one holds too long a copy, however
        # common its grams are (the exact rule, within one message; no positions needed).
        self._windows = np.sort(gram_hashes(self._doc, max_chars + 1))
        # Every gram with its positions: where what is sent lies in the documents, across messages.
        hashes = gram_hashes(self._doc, self.gram)
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]
        self._revealed = bytearray(len(self._doc))
        self._known: set[str] = set()

    def learn(self, text: str) -> None:
        """Record text the cloud already has (the task, fixed prompts, the planner's replies): never withheld."""
        normal = normalise(text)[0]
        for g in (self.gram, self.max_chars + 1):
            self._known.update(normal[i : i + g] for i in range(len(normal) - g + 1))

    def _run_if_marked(self, p: int) -> int:
        """Length of the revealed run that marking document positions [p, p + gram) would make."""
        g = self.gram
        left = p - (self._revealed.rfind(0, 0, p) + 1)
        right_end = self._revealed.find(0, p + g)
        right = (len(self._revealed) if right_end < 0 else right_end) - (p + g)
        return left + g + right

    def redact(self, text: str) -> str:
        """`text` with every part that would reveal too long a run of the documents replaced by ``[…]``.

        Marks what it lets through as revealed (call it once per message sent).
        """
        normal, start, end = normalise(text)
        withhold = bytearray(len(normal))
        # 1. Within the message: every window of N + 1 document characters (64-bit hashes; a
        #    collision can only withhold more).
        n = self.max_chars + 1
        long = gram_hashes(normal, n)
        if len(long) and len(self._windows):
            hit = np.searchsorted(self._windows, long).clip(max=len(self._windows) - 1)
            for i in np.nonzero(self._windows[hit] == long)[0].tolist():
                if normal[i : i + n] not in self._known:
                    withhold[i : i + n] = b"\x01" * n
        # 2. Across messages: place each gram in the documents and keep revealed runs <= N.
        g = self.gram
        hashes = gram_hashes(normal, g)
        if len(hashes) and len(self._sorted):
            lo = np.searchsorted(self._sorted, hashes, side="left")
            hi = np.searchsorted(self._sorted, hashes, side="right")
            for i in np.nonzero(hi > lo)[0].tolist():
                gram = normal[i : i + g]
                if gram in self._known or hi[i] - lo[i] > MAX_OCCURRENCES:
                    continue
                places = [p for p in self._order[lo[i] : hi[i]].tolist() if self._doc[p : p + g] == gram]
                if not places:
                    continue  # a hash collision
                if any(withhold[i : i + g]) or any(self._run_if_marked(p) > self.max_chars for p in places):
                    withhold[i : i + g] = b"\x01" * g
                # Withheld places count as revealed too, so the rest of a long copy stays withheld
                # (not N characters, a gap, N more) and no later piece can land right after it.
                for p in places:
                    self._revealed[p : p + g] = b"\x01" * g
        if not any(withhold):
            return text
        cut = bytearray(len(text))
        for k in np.nonzero(np.frombuffer(bytes(withhold), dtype=np.uint8))[0].tolist():
            cut[start[k] : end[k]] = b"\x01" * (end[k] - start[k])
        out: list[str] = []
        pos = 0
        for m in _CUT.finditer(bytes(cut)):
            out.append(text[pos : m.start()])
            out.append(MARKER)
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)

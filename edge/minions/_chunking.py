"""Cutting documents into chunks the edge model reads one at a time (MinionS).

What belongs here: splitting text by section headings, then paragraphs, then sentences,
and packing the pieces into chunks of at most `max_tokens`; plus the keyword selector's
matching. What does not: prompts, models or the network. Chunk text never leaves the
device; the cloud only ever sees chunk ids and counts.

A section is a run of text under a heading line (Markdown ``#`` headings, or numbered
headings such as ``2.3 Results``). Paragraphs are separated by blank lines. A chunk never
spans two documents or two sections, so each chunk carries the heading it belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tether.errors import ConfigurationError

_HEADING = re.compile(r"^(#{1,6}\s+\S.*|\d+(\.\d+)*\.?\s+[A-Z][^\n]{0,80})$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate: about 4 characters per token (used when no tokenizer is given)."""
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """A piece of one document.

    Attributes:
        id: the chunk's index over all documents, in order (what the cloud refers to).
        document: index of the document it comes from.
        section: the heading of its section ("" before the first heading).
        text: the chunk's text (without the heading).
        start: offset of the text in the document (characters).
        tokens: its length in tokens (by the counter used to chunk).
    """

    id: int
    document: int
    section: str
    text: str
    start: int
    tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkingOptions:
    """How documents are cut.

    Attributes:
        max_tokens: most tokens per chunk (pieces longer than this are split by sentence,
            then hard-split by characters).
        min_tokens: a section shorter than this is merged with the next section of the
            same document, so tiny sections do not become chunks of their own.
        by_section: split at section headings (True), or treat the document as one section.
    """

    max_tokens: int = 1024
    min_tokens: int = 64
    by_section: bool = True

    def __post_init__(self) -> None:
        if not 16 <= self.max_tokens <= 32_768:
            raise ConfigurationError(f"chunk max_tokens must be in [16, 32768], got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigurationError(f"chunk min_tokens must be in [0, max_tokens], got {self.min_tokens}")


def _sections(text: str, by_section: bool) -> list[tuple[str, str, int]]:
    """(heading, body, body offset) for each section, in order."""
    if not by_section:
        return [("", text, 0)]
    out: list[tuple[str, str, int]] = []
    heading, body_start = "", 0
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and _HEADING.match(stripped) and len(stripped) <= 120:
            out.append((heading, text[body_start:pos], body_start))
            heading, body_start = stripped.lstrip("#").strip(), pos + len(line)
        pos += len(line)
    out.append((heading, text[body_start:], body_start))
    return [s for s in out if s[1].strip() or s[0]]


def _pieces(body: str, offset: int, max_tokens: int, count: TokenCounter) -> list[tuple[str, int]]:
    """Paragraphs (or, when too long, sentences or hard slices) with their offsets."""
    out: list[tuple[str, int]] = []
    for m in re.finditer(r"\S(?:.|\n(?!\s*\n))*", body):
        para, start = m.group().strip(), offset + m.start()
        if count(para) <= max_tokens:
            out.append((para, start))
            continue
        sent_start = 0
        for s in _SENTENCE_END.split(para):
            at = para.find(s, sent_start)
            sent_start = at + len(s)
            if count(s) <= max_tokens:
                out.append((s, start + at))
                continue
            step = max(1, len(s) * max_tokens // max(1, count(s)))
            while True:  # hard split, shrinking until each slice fits
                slices = [s[i:i + step] for i in range(0, len(s), step)]
                if all(count(x) <= max_tokens for x in slices) or step == 1:
                    break
                step = max(1, step * 3 // 4)
            out.extend((x, start + at + i * step) for i, x in enumerate(slices))
    return out


def chunk_documents(
    documents: Sequence[str],
    options: ChunkingOptions | None = None,
    *,
    count_tokens: TokenCounter | None = None,
) -> list[Chunk]:
    """Cut every document into chunks of at most ``options.max_tokens`` tokens.

    Args:
        documents: the texts.
        options: sizes and the section rule (defaults: 1024-token chunks, by section).
        count_tokens: counts a text's tokens (the edge tokenizer's length); default
            `approx_tokens`.

    Returns:
        The chunks of all documents in order; ids are 0, 1, 2, ... Empty documents give none.

    Raises:
        ConfigurationError: a document is not a string.
    """
    opts = options or ChunkingOptions()
    count = count_tokens or approx_tokens
    chunks: list[Chunk] = []
    for doc_index, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ConfigurationError(f"document {doc_index} must be a string, got {type(doc).__name__}")
        sections = _sections(doc, opts.by_section)
        # Merge sections too small to stand alone into the next one.
        merged: list[tuple[str, list[tuple[str, int]]]] = []
        carry: list[tuple[str, int]] = []
        carry_heading = ""
        for heading, body, offset in sections:
            pieces = carry + _pieces(body, offset, opts.max_tokens, count)
            head = carry_heading or heading
            if heading and carry_heading and heading != carry_heading:
                head = f"{carry_heading} / {heading}"
            if sum(count(p) for p, _ in pieces) < opts.min_tokens:
                carry, carry_heading = pieces, head
                continue
            merged.append((head, pieces))
            carry, carry_heading = [], ""
        if carry:
            if merged:
                merged[-1][1].extend(carry)
            else:
                merged.append((carry_heading, carry))
        for heading, pieces in merged:
            buf: list[str] = []
            buf_tokens = 0
            buf_start = 0
            for text, start in pieces:
                n = count(text)
                if buf and buf_tokens + n > opts.max_tokens:
                    chunks.append(Chunk(id=len(chunks), document=doc_index, section=heading,
                                        text="\n\n".join(buf), start=buf_start, tokens=buf_tokens))
                    buf, buf_tokens = [], 0
                if not buf:
                    buf_start = start
                buf.append(text)
                buf_tokens += n + (1 if len(buf) > 1 else 0)
            if buf:
                chunks.append(Chunk(id=len(chunks), document=doc_index, section=heading,
                                    text="\n\n".join(buf), start=buf_start, tokens=buf_tokens))
    return chunks


def contains_any(chunk: Chunk, keywords: Sequence[str]) -> bool:
    """Whether the chunk's section heading or text contains any keyword (case-insensitive)."""
    hay = f"{chunk.section}\n{chunk.text}".casefold()
    return any(k.casefold() in hay for k in keywords if k)

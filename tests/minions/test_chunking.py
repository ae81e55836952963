"""Chunking: sections, paragraphs, size bounds, ids, offsets, the keyword selector."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.edge import Chunk, ChunkingOptions, chunk_documents
from tether.edge.minions._chunking import approx_tokens, contains_any
from tether.errors import ConfigurationError

from .conftest import REPORT


def words(text: str) -> int:
    return len(text.split())


def test_sections_become_chunks_with_their_heading() -> None:
    chunks = chunk_documents([REPORT], ChunkingOptions(max_tokens=200, min_tokens=5), count_tokens=words)
    assert [c.section for c in chunks] == ["Quarterly report / 1. Sales", "2. People", "3. Outlook"]
    assert chunks[0].text.startswith("The Aurora team sold 120 units")
    assert "Returns stayed low" in chunks[0].text  # paragraphs of a section stay together
    assert [c.id for c in chunks] == [0, 1, 2]


def test_small_sections_merge_forward() -> None:
    chunks = chunk_documents([REPORT], ChunkingOptions(max_tokens=200, min_tokens=30), count_tokens=words)
    assert len(chunks) < 3
    assert all(c.tokens <= 200 for c in chunks)


def test_paragraphs_pack_up_to_the_limit() -> None:
    doc = "\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(10))  # 22 words each
    chunks = chunk_documents([doc], ChunkingOptions(max_tokens=50, min_tokens=0), count_tokens=words)
    assert [c.text.count("Paragraph") for c in chunks] == [2] * 5
    assert all(c.tokens <= 50 for c in chunks)


def test_long_paragraphs_split_by_sentence_then_hard() -> None:
    para = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_documents([para], ChunkingOptions(max_tokens=20, min_tokens=0), count_tokens=words)
    assert len(chunks) > 1 and all(c.tokens <= 20 for c in chunks)
    blob = "x" * 5000  # no sentences, no spaces
    chunks = chunk_documents([blob], ChunkingOptions(max_tokens=100, min_tokens=0))
    assert all(approx_tokens(c.text) <= 100 for c in chunks)
    assert "".join(c.text for c in chunks) == blob


def test_chunks_never_span_documents_and_ids_run_on() -> None:
    chunks = chunk_documents(["# A\n\nalpha text here", "", "# B\n\nbeta text here"],
                             ChunkingOptions(max_tokens=64, min_tokens=0))
    assert [(c.id, c.document) for c in chunks] == [(0, 0), (1, 2)]


def test_offsets_point_into_the_document() -> None:
    chunks = chunk_documents([REPORT], ChunkingOptions(max_tokens=16, min_tokens=0), count_tokens=words)
    for c in chunks:
        first_piece = c.text.split("\n\n")[0]
        assert REPORT[c.start:].startswith(first_piece)


def test_no_section_mode() -> None:
    chunks = chunk_documents([REPORT], ChunkingOptions(max_tokens=4096, by_section=False))
    assert len(chunks) == 1 and chunks[0].section == ""


def test_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match=r"chunk max_tokens must be in \[16, 32768\], got 8"):
        ChunkingOptions(max_tokens=8)
    with pytest.raises(ConfigurationError, match="document 0 must be a string, got bytes"):
        chunk_documents([b"bytes"])  # type: ignore[list-item]


def test_contains_any() -> None:
    c = Chunk(id=0, document=0, section="Cobalt Division", text="Revenue was high.", start=0, tokens=4)
    assert contains_any(c, ["cobalt"]) and contains_any(c, ["REVENUE", "zzz"])
    assert not contains_any(c, ["harbor", ""])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab .\n#12"), max_size=400), min_size=1, max_size=3),
       st.integers(min_value=16, max_value=80))
def test_every_chunk_fits_and_no_text_is_lost(docs: list[str], max_tokens: int) -> None:
    chunks = chunk_documents(docs, ChunkingOptions(max_tokens=max_tokens, min_tokens=0))
    assert all(c.tokens <= max_tokens for c in chunks)
    for d, doc in enumerate(docs):
        kept = "".join("".join(c.text.split()) for c in chunks if c.document == d)
        body = "".join(line for line in doc.splitlines() if not line.strip().startswith("#"))
        # Everything but heading lines survives (whitespace aside).
        assert len(kept) >= len("".join(body.split())) - sum(len(c.section) for c in chunks)

"""The generated long-document QA set: deterministic, long, facts spread out, answers checkable."""

from __future__ import annotations

import re

import pytest

from benchmarks.longdoc import generate, numbers_in, score


def test_deterministic_and_long() -> None:
    a, b = generate(2), generate(2)
    assert a == b
    assert a[0].text != a[1].text
    for doc in a:
        assert len(doc.text) >= 100_000  # ~20.7k Qwen tokens each (measured in docs/benchmarks.md)
        assert len(doc.questions) == 4 and len({q.id for q in doc.questions}) == 4
    assert generate(1, seed=1)[0].text != a[0].text


def test_every_answer_follows_from_facts_in_separate_places() -> None:
    for doc in generate(2, questions_per_doc=5):
        for q in doc.questions:
            positions = []
            values = []
            for need in q.needs:
                name, what, value = re.match(r"(\w+) (Q\d|headcount) = (\d+)", need).groups()  # type: ignore[union-attr]
                figure = f"{int(value):,}"
                # Each fact is stated once, in its division's section.
                section = doc.text.index(f"{name} Division")
                at = doc.text.index(figure, section)
                positions.append(at)
                values.append(int(value))
            assert len(set(positions)) == len(positions)
            if "exceed" in q.question or "more people" in q.question:
                assert q.answer == values[0] - values[1] or q.answer == values[1] - values[0]
            else:
                assert q.answer == sum(values)
            # Facts are far apart: no single 1k-token window holds them all.
            assert max(positions) - min(positions) > 4_000


@pytest.mark.parametrize(("text", "expected", "ok"), [
    ("4,794", 4794, True),
    ("$4,794 thousand", 4794, True),
    ("The total is 4794.", 4794, True),
    ("1196 + 3598 = 4794", 4794, True),  # a calculation: the number after the last "="
    ("4794 (1196 + 3598)", 4794, True),  # otherwise the first number
    ("1196 + 3598 = 4795", 4794, False),
    ("", 1, False),
    (None, 1, False),
    ("about 4794.4", 4794, True),
    ("Q3 revenue was 4,794", 4794, True),
])
def test_score(text: str | None, expected: int, ok: bool) -> None:
    assert score(text, expected) is ok


def test_numbers_in() -> None:
    assert numbers_in("Q3: $1,196 and -7.5") == [1196.0, -7.5]

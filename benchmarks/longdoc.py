"""A long-document QA set with checkable answers, generated deterministically from a seed.

What belongs here: synthetic annual operations reports of fictional companies (20k+ tokens
each), questions whose answers need facts from several sections plus a little arithmetic,
and the scorer. What does not: running any model (see `benchmarks/minions.py`).

Each report has one section per division. A division's quarterly revenue is stated in two
paragraphs far apart (Q1/Q2 early in the section, Q3/Q4 after pages of narrative), its
year-end headcount in a third, and each section carries distractors: last year's figures,
budgets, counts of other things. Questions combine two or three divisions (sums,
differences), so no single chunk holds an answer. Answers are integers; `score` accepts a
reply whose number (after its last ``=``, else its first) equals the expected value.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["LongDoc", "QAItem", "generate", "numbers_in", "score"]

_COMPANIES = ("Norhaven Logistics", "Kestrel Biosystems", "Altamira Foods", "Pellucid Networks")
_DIVISIONS = ("Aurora", "Borealis", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Harbor", "Ionic", "Juniper")
_CITIES = ("Lisbon", "Tampere", "Calgary", "Osaka", "Porto", "Lyon", "Dresden", "Halifax", "Perth", "Leeds")
_TOPICS = ("supplier onboarding", "warehouse automation", "customer support tooling", "energy efficiency",
           "data retention policy", "quality audits", "route planning", "employee training", "billing migration",
           "security reviews", "procurement controls", "vendor consolidation", "field service scheduling")
_ADJ = ("steady", "uneven", "encouraging", "modest", "solid", "cautious", "measured", "broad", "gradual")
_VERBS = ("reviewed", "consolidated", "piloted", "expanded", "streamlined", "documented", "renegotiated",
          "replaced", "standardised", "audited")
_SENTENCES = (
    "The team {verb} its approach to {topic} during the year, with {adj} results across most sites.",
    "Management notes that progress on {topic} was {adj}, and further work is planned for next year.",
    "Staff in {city} {verb} the processes for {topic}, which reduced rework noticeably.",
    "A cross-functional group {verb} the backlog related to {topic} and closed most open items.",
    "Feedback from customers in {city} on {topic} was {adj}, according to the quarterly survey.",
    "The division {verb} several contracts tied to {topic}, aiming for simpler terms.",
    "Leadership considers {topic} a priority, and the {city} office will host the next working group.",
    "External auditors {verb} the controls around {topic} and reported no material findings.",
    "Investment in {topic} remained {adj}, reflecting the wider market conditions of the period.",
    "Several long-standing issues with {topic} were {verb} by a small internal task force.",
    "The {city} site completed {small} workshops on {topic} for new and existing employees.",
    "Turnover among specialists working on {topic} was {adj}, and hiring plans were adjusted.",
    "The board asked for a clearer roadmap on {topic}, which the division {verb} in the autumn.",
    "Internal reporting on {topic} was {verb} so that regional managers see the same figures.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class QAItem:
    """One question over one document.

    Attributes:
        id: unique id, ``"<doc id>-q<n>"``.
        doc_id: the document it is about.
        question: the question text (asks for one integer).
        answer: the expected integer.
        needs: the facts it combines, as human-readable strings (for error analysis).
    """

    id: str
    doc_id: str
    question: str
    answer: int
    needs: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LongDoc:
    """One generated report and its questions."""

    id: str
    title: str
    text: str
    questions: tuple[QAItem, ...]


def _paragraph(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        tpl = rng.choice(_SENTENCES)
        out.append(tpl.format(verb=rng.choice(_VERBS), topic=rng.choice(_TOPICS), adj=rng.choice(_ADJ),
                              city=rng.choice(_CITIES), small=rng.randint(2, 9)))
    return " ".join(out)


def _filler(rng: random.Random, paragraphs: int) -> list[str]:
    return [_paragraph(rng, rng.randint(4, 7)) for _ in range(paragraphs)]


def _division_section(rng: random.Random, number: int, name: str, facts: dict[str, int], filler: int) -> str:
    city = rng.choice(_CITIES)
    q = [facts[f"{name}.q{i}"] for i in range(1, 5)]
    prev_q3 = q[2] + rng.choice((-1, 1)) * rng.randint(40, 400)
    budget = rng.randint(20, 90) * 100
    paras = [f"## {number}. {name} Division", f"The {name} division is headquartered in {city}. " + _paragraph(rng, 4)]
    paras += _filler(rng, filler // 3)
    paras.append(
        f"Revenue, first half. In the first quarter (Q1) the {name} division recorded revenue of "
        f"${q[0]:,} thousand. In the second quarter (Q2) revenue was ${q[1]:,} thousand."
    )
    paras += _filler(rng, filler // 3)
    paras.append(
        f"The {name} division's operating budget for next year is set at ${budget:,} thousand, "
        f"and it ran {rng.randint(3, 30)} customer pilots during the year."
    )
    paras += _filler(rng, filler // 6)
    paras.append(
        f"Revenue, second half. The {name} division reported Q3 revenue of ${q[2]:,} thousand and "
        f"Q4 revenue of ${q[3]:,} thousand. For comparison, Q3 revenue in the previous year was "
        f"${prev_q3:,} thousand."
    )
    paras += _filler(rng, filler // 6)
    paras.append(
        f"People. At the end of the year the {name} division employed {facts[f'{name}.headcount']:,} people, "
        f"up from {facts[f'{name}.headcount'] - rng.randint(5, 60):,} a year earlier."
    )
    paras += _filler(rng, max(1, filler // 6))
    return "\n\n".join(paras)


def _questions(rng: random.Random, doc_id: str, divisions: list[str], facts: dict[str, int], n: int) -> list[QAItem]:
    items: list[QAItem] = []
    kinds = ["sum_q3", "growth", "headcount3", "headcount_diff", "sum_h1"]
    for k in range(n):
        kind = kinds[k % len(kinds)]
        a, b, c = rng.sample(divisions, 3)
        if kind == "sum_q3":
            ans = facts[f"{a}.q3"] + facts[f"{b}.q3"]
            q = (f"What was the combined Q3 revenue of the {a} and {b} divisions, in thousands of dollars?")
            needs = (f"{a} Q3 = {facts[f'{a}.q3']}", f"{b} Q3 = {facts[f'{b}.q3']}")
        elif kind == "growth":
            ans = facts[f"{a}.q4"] - facts[f"{a}.q1"]
            q = (f"By how much did the {a} division's Q4 revenue exceed its Q1 revenue, in thousands of dollars?")
            needs = (f"{a} Q1 = {facts[f'{a}.q1']}", f"{a} Q4 = {facts[f'{a}.q4']}")
        elif kind == "headcount3":
            ans = sum(facts[f"{d}.headcount"] for d in (a, b, c))
            q = f"How many people did the {a}, {b} and {c} divisions employ in total at the end of the year?"
            needs = tuple(f"{d} headcount = {facts[f'{d}.headcount']}" for d in (a, b, c))
        elif kind == "headcount_diff":
            big, small = sorted((a, b), key=lambda d: -facts[f"{d}.headcount"])
            ans = facts[f"{big}.headcount"] - facts[f"{small}.headcount"]
            q = (f"At the end of the year, how many more people did the {big} division employ than the "
                 f"{small} division?")
            needs = (f"{big} headcount = {facts[f'{big}.headcount']}", f"{small} headcount = {facts[f'{small}.headcount']}")
        else:
            ans = facts[f"{a}.q1"] + facts[f"{a}.q2"] + facts[f"{b}.q1"] + facts[f"{b}.q2"]
            q = (f"What was the total first-half (Q1 plus Q2) revenue of the {a} and {b} divisions combined, "
                 f"in thousands of dollars?")
            needs = tuple(f"{d} Q{i} = {facts[f'{d}.q{i}']}" for d in (a, b) for i in (1, 2))
        items.append(QAItem(id=f"{doc_id}-q{k + 1}", doc_id=doc_id, question=q, answer=ans, needs=needs))
    return items


def generate(
    n_docs: int = 2, *, questions_per_doc: int = 4, seed: int = 0, divisions: int = 8, filler: int = 22
) -> list[LongDoc]:
    """Generate the QA set; the same arguments always give the same documents.

    Args:
        n_docs: documents (at most 4 company names are used, cycling).
        questions_per_doc: questions per document.
        seed: the random seed.
        divisions: division sections per report (at most 10).
        filler: narrative paragraphs per division section; the default gives ~21k tokens
            (Qwen tokenizer) per report.

    Returns:
        The documents with their questions.
    """
    if not 3 <= divisions <= len(_DIVISIONS):
        raise ValueError(f"divisions must be in [3, {len(_DIVISIONS)}], got {divisions}")
    docs: list[LongDoc] = []
    for d in range(n_docs):
        rng = random.Random(f"tether-longdoc-{seed}-{d}")
        company = _COMPANIES[d % len(_COMPANIES)]
        year = 2019 + (seed + d) % 6
        names = rng.sample(_DIVISIONS, divisions)
        facts: dict[str, int] = {}
        for name in names:
            base = rng.randint(8, 60) * 100
            for i in range(1, 5):
                facts[f"{name}.q{i}"] = base + rng.randint(-700, 900)
            facts[f"{name}.headcount"] = rng.randint(40, 900)
        title = f"{company}: Annual Operations Report {year}"
        parts = [f"# {title}", "## 1. Overview"] + _filler(rng, 6)
        for i, name in enumerate(names):
            parts.append(_division_section(rng, i + 2, name, facts, filler))
        parts += [f"## {len(names) + 2}. Outlook"] + _filler(rng, 4)
        doc_id = f"report{d + 1}"
        docs.append(LongDoc(id=doc_id, title=title, text="\n\n".join(parts) + "\n",
                            questions=tuple(_questions(rng, doc_id, names, facts, questions_per_doc))))
    return docs


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")  # not the 3 of "Q3"


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, thousands separators removed (``"$1,234"`` -> 1234.0).

    Digits glued to letters (the 3 of ``"Q3"``) are not numbers.
    """
    out: list[float] = []
    for m in _NUMBER.finditer(text):
        raw = m.group().replace(",", "")
        try:
            out.append(float(raw))
        except ValueError:
            continue
    return out


def score(answer: str | None, expected: int) -> bool:
    """True when the answer's number equals `expected` (within 0.5).

    The answer's number is the one after its last ``=`` when it shows a calculation
    (``"842 - 505 = 337"``), else its first number.
    """
    if not answer:
        return False
    tail = answer.rsplit("=", 1)[1] if "=" in answer else answer
    nums = numbers_in(tail)
    return bool(nums) and abs(nums[0] - expected) < 0.5

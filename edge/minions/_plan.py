"""What the cloud may say in Minion and MinionS, and the checks every reply passes first.

What belongs here: finding one JSON object in a model's reply (code fences, prose around it),
the bounded, declarative schema of cloud turns (Minion: ask or answer; MinionS: jobs or
answer), and the typed errors of a reply that breaks it. What does not: prompts, models, I/O.

Nothing the cloud sends is ever executed. A MinionS plan is data: each job is an instruction
(text for the edge model to read), a chunk selector (``"all"``, chunk ids, document
indices, or keywords matched as plain substrings) and optional hints. Every size is checked
against `PlanLimits` before anything is allocated or run: the reply's length before it is
parsed, its nesting depth before it is decoded, then every count and string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tether.edge._errors import EdgeError
from tether.errors import ConfigurationError


class MinionsError(EdgeError):
    """Root of the errors of Minion and MinionS (`EdgeClient.ask`)."""


class PlanError(MinionsError):
    """A cloud reply broke the protocol (the peer misbehaved, not the caller).

    Attributes:
        path: where in the reply (``"jobs[2].chunks"``; ``""`` for the reply as a whole).
        size: the offending size, for limit violations.
        limit: the limit it broke.
    """

    def __init__(self, message: str, *, path: str = "", size: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.size = size
        self.limit = limit


class ReplyTooLarge(PlanError):
    """The reply, or one of its parts, is bigger than `PlanLimits` allows."""


class NotJSON(PlanError):
    """No JSON object could be found in the reply."""


class SchemaViolation(PlanError):
    """The JSON object does not follow the schema (missing, wrong or unknown fields)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanLimits:
    """Bounds on what the cloud may send; all checked before use.

    Attributes:
        max_reply_chars: characters of one cloud reply (checked before parsing).
        max_depth: nesting depth of the reply's JSON (checked before decoding).
        max_jobs: jobs in one plan.
        max_instruction_chars: characters of a job's instruction.
        max_hint_chars: characters of a job's hints.
        max_chunk_ids: chunk ids (or document indices) in one selector.
        max_keywords: keywords in one ``contains_any`` selector.
        max_keyword_chars: characters per keyword.
        max_edge_runs: job x chunk pairs one round may run on the edge.
        max_question_chars: characters of a Minion question.
        max_answer_chars: characters of a final answer.
    """

    max_reply_chars: int = 16_000
    max_depth: int = 6
    max_jobs: int = 8
    max_instruction_chars: int = 600
    max_hint_chars: int = 400
    max_chunk_ids: int = 256
    max_keywords: int = 8
    max_keyword_chars: int = 40
    max_edge_runs: int = 256
    max_question_chars: int = 1_000
    max_answer_chars: int = 4_000

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"PlanLimits.{name} must be a positive integer, got {value!r}")


# -- finding the JSON object ------------------------------------------------------------------

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_MAX_CANDIDATES = 32


def _depth(text: str) -> int:
    """Deepest nesting of ``{``/``[`` outside strings (no decoding, so no recursion)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
            best = max(best, depth)
        elif ch in "}]":
            depth = max(0, depth - 1)
    return best


def extract_json(text: str, limits: PlanLimits | None = None) -> dict[str, Any]:
    """The first JSON object in a model's reply.

    Tolerates what small models add: Markdown code fences, prose before or after the
    object, and trailing commas before a closing bracket.

    Raises:
        ReplyTooLarge: the reply is longer than ``limits.max_reply_chars`` or nests deeper
            than ``limits.max_depth``.
        NotJSON: no JSON object was found.
    """
    lim = limits or PlanLimits()
    if len(text) > lim.max_reply_chars:
        raise ReplyTooLarge(f"reply of {len(text)} characters exceeds the limit of {lim.max_reply_chars}",
                            size=len(text), limit=lim.max_reply_chars)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    tried = 0
    for cand in candidates:
        start = cand.find("{")
        while start >= 0 and tried < _MAX_CANDIDATES:
            tried += 1
            depth = _depth(cand[start:])
            if depth > lim.max_depth:
                raise ReplyTooLarge(f"reply nests {depth} levels deep; the limit is {lim.max_depth}",
                                    size=depth, limit=lim.max_depth)
            for body in (cand[start:], re.sub(r",\s*([}\]])", r"\1", cand[start:])):
                try:
                    value, _ = decoder.raw_decode(body)
                except (ValueError, RecursionError):
                    continue
                if isinstance(value, dict):
                    return value
            start = cand.find("{", start + 1)
    raise NotJSON("the reply holds no JSON object")


# -- checking fields -------------------------------------------------------------------------

_FORBIDDEN = re.compile(r"<\||\|>|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _text(obj: Mapping[str, Any], key: str, path: str, limit: int, *, required: bool = True) -> str:
    value = obj.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        if required:
            raise SchemaViolation(f"{where} is missing", path=where)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise SchemaViolation(f"{where} must be a string, got {type(value).__name__}", path=where)
    if len(value) > limit:
        raise ReplyTooLarge(f"{where} has {len(value)} characters; the limit is {limit}",
                            path=where, size=len(value), limit=limit)
    if _FORBIDDEN.search(value):
        raise SchemaViolation(f"{where} contains control characters or special-token markers", path=where)
    value = value.strip()
    if required and not value:
        raise SchemaViolation(f"{where} is empty", path=where)
    return value


def _no_unknown(obj: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise SchemaViolation(f"{path or 'reply'} has unknown fields {shown}; allowed: {', '.join(sorted(allowed))}",
                              path=path)


def _action(obj: Mapping[str, Any], payloads: Mapping[str, str]) -> str:
    """The reply's action; `payloads` maps each action to the field that carries it."""
    choices = ", ".join(map(repr, payloads))
    action = obj.get("action")
    if action is None:  # small models often drop it; infer it from the payload present
        found = [a for a, key in payloads.items() if key in obj]
        if len(found) == 1:
            return found[0]
        raise SchemaViolation(f"action is missing; use one of {choices}", path="action")
    if action not in payloads:
        raise SchemaViolation(f"action must be one of {choices}, got {str(action)[:40]!r}", path="action")
    return str(action)


# -- the schema ----------------------------------------------------------------------------

SelectorKind = Literal["all", "ids", "documents", "contains_any"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkSelector:
    """Which chunks a job runs on (resolved on the device; chunk text never leaves it).

    Attributes:
        kind: ``"all"``, ``"ids"`` (chunk ids), ``"documents"`` (every chunk of these
            document indices) or ``"contains_any"`` (chunks whose text or heading contains
            one of the keywords, case-insensitive substring match; refused unless
            ``MinionsOptions.keyword_selection``, since it reveals where a keyword occurs).
        ids: the chunk ids or document indices.
        keywords: the keywords.
    """

    kind: SelectorKind = "all"
    ids: tuple[int, ...] = ()
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One instruction the edge model runs on every selected chunk."""

    instruction: str
    chunks: ChunkSelector
    hints: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A MinionS cloud turn that asks for work: run these jobs."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Question:
    """A Minion cloud turn that asks the edge model a question."""

    question: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalAnswer:
    """A cloud turn that ends the session with an answer."""

    answer: str


def _ints(value: Any, path: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise SchemaViolation(f"{path} must be a list of integers", path=path)
    if len(value) > limit:
        raise ReplyTooLarge(f"{path} lists {len(value)} entries; the limit is {limit}", path=path,
                            size=len(value), limit=limit)
    out: list[int] = []
    for i, v in enumerate(value):
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SchemaViolation(f"{path}[{i}] must be a non-negative integer, got {str(v)[:20]!r}", path=f"{path}[{i}]")
        out.append(v)
    return tuple(dict.fromkeys(out))


_ID_LIST = re.compile(r"\s*\d{1,6}(?:\s*,?\s*\d{1,6})*\s*")


def _selector(value: Any, path: str, lim: PlanLimits) -> ChunkSelector:
    if value is None or value == "all":
        return ChunkSelector()
    if isinstance(value, list):
        return ChunkSelector(kind="ids", ids=_ints(value, path, lim.max_chunk_ids))
    if isinstance(value, str) and _ID_LIST.fullmatch(value):  # "3" or "3, 4": small models quote ids
        return ChunkSelector(kind="ids", ids=_ints(value.replace(",", " ").split(), path, lim.max_chunk_ids))
    if isinstance(value, dict):
        if len(value) != 1:
            raise SchemaViolation(f"{path} must have exactly one of 'ids', 'documents', 'contains_any'", path=path)
        (key, inner), = value.items()
        if key == "ids":
            return ChunkSelector(kind="ids", ids=_ints(inner, f"{path}.ids", lim.max_chunk_ids))
        if key == "documents":
            return ChunkSelector(kind="documents", ids=_ints(inner, f"{path}.documents", lim.max_chunk_ids))
        if key == "contains_any":
            where = f"{path}.contains_any"
            if not isinstance(inner, list) or not inner:
                raise SchemaViolation(f"{where} must be a non-empty list of strings", path=where)
            if len(inner) > lim.max_keywords:
                raise ReplyTooLarge(f"{where} lists {len(inner)} keywords; the limit is {lim.max_keywords}",
                                    path=where, size=len(inner), limit=lim.max_keywords)
            words = tuple(_text({"k": w}, "k", f"{where}[{i}]", lim.max_keyword_chars) for i, w in enumerate(inner))
            return ChunkSelector(kind="contains_any", keywords=words)
        raise SchemaViolation(f"{path} has unknown selector {str(key)[:40]!r}", path=path)
    raise SchemaViolation(f"{path} must be \"all\", a list of chunk ids, or an object selector", path=path)


def parse_plan(text: str, limits: PlanLimits | None = None) -> Plan | FinalAnswer:
    """Validate a MinionS cloud turn.

    Schema: ``{"action": "jobs", "jobs": [{"instruction": str, "chunks": "all" | [id, ...] |
    {"ids": [...]} | {"documents": [...]} | {"contains_any": [str, ...]}, "hints": str}]}``
    or ``{"action": "answer", "answer": str}``. Other top-level fields (small models add
    "reasoning" or "citation") are ignored: they are never read, and the reply's size is
    bounded. Fields of a job are strict: an unknown one (``"chunk_ids"``, ``"code"``) is an
    error, since silently dropping it could change which chunks run.

    Raises:
        PlanError: `ReplyTooLarge`, `NotJSON` or `SchemaViolation`, with the path and sizes.
    """
    lim = limits or PlanLimits()
    obj = extract_json(text, lim)
    if _action(obj, {"jobs": "jobs", "answer": "answer"}) == "answer":
        return FinalAnswer(answer=_text(obj, "answer", "", lim.max_answer_chars))
    jobs = obj.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise SchemaViolation("jobs must be a non-empty list", path="jobs")
    if len(jobs) > lim.max_jobs:
        raise ReplyTooLarge(f"the plan has {len(jobs)} jobs; the limit is {lim.max_jobs}", path="jobs",
                            size=len(jobs), limit=lim.max_jobs)
    out: list[Job] = []
    for i, job in enumerate(jobs):
        path = f"jobs[{i}]"
        if not isinstance(job, dict):
            raise SchemaViolation(f"{path} must be an object", path=path)
        _no_unknown(job, frozenset({"instruction", "chunks", "hints"}), path)
        out.append(Job(
            instruction=_text(job, "instruction", path, lim.max_instruction_chars),
            chunks=_selector(job.get("chunks"), f"{path}.chunks", lim),
            hints=_text(job, "hints", path, lim.max_hint_chars, required=False),
        ))
    return Plan(jobs=tuple(out))


def parse_minion_turn(text: str, limits: PlanLimits | None = None) -> Question | FinalAnswer:
    """Validate a Minion cloud turn: ``{"action": "ask", "question": str}`` or
    ``{"action": "answer", "answer": str}`` (other top-level fields are ignored).

    Raises:
        PlanError: `ReplyTooLarge`, `NotJSON` or `SchemaViolation`.
    """
    lim = limits or PlanLimits()
    obj = extract_json(text, lim)
    if _action(obj, {"ask": "question", "answer": "answer"}) == "answer":
        return FinalAnswer(answer=_text(obj, "answer", "", lim.max_answer_chars))
    return Question(question=_text(obj, "question", "", lim.max_question_chars))


# -- what the edge model writes ------------------------------------------------------------------

_ABSTAIN = re.compile(
    r"^(none|null|n/?a|unknown|not (found|mentioned|provided|given|available|stated|specified|applicable)"
    r"|no (information|data|answer|mention)( found| available| provided)?|-|\?|)\.?$",
    re.I,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReply:
    """What the edge model answered for one job on one chunk (abstention: `answer` is None)."""

    answer: str | None
    citation: str


# A reply cut off by the token limit: the answer is complete, the citation may not be.
_CUT_REPLY = re.compile(
    r'\s*\{\s*"answer"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?=\s*,)|null)\s*'
    r'(?:,\s*"citation"\s*:\s*"((?:[^"\\]|\\.)*))?', re.S)


def _cut_reply(text: str) -> dict[str, Any] | None:
    """The fields of a worker reply whose JSON object was cut off mid-way, or None.

    The edge model writes the answer first and the quote after it, so a reply that hit
    ``edge_max_tokens`` usually holds a whole answer and part of a quote: keep both (the
    partial quote is still checked against the chunk by grounding).
    """
    m = _CUT_REPLY.match(text)
    if m is None:
        return None
    obj: dict[str, Any] = {"answer": json.loads(m.group(1))}
    if m.group(2):
        raw = m.group(2).rstrip("\\")  # a dangling escape at the cut
        try:
            obj["citation"] = json.loads(f'"{raw}"')
        except ValueError:
            obj["citation"] = ""
    return obj


def parse_worker_reply(text: str, *, max_chars: int = 300) -> WorkerReply:
    """Read the edge model's ``{"answer": ..., "citation": ...}``; anything unusable abstains.

    Answers are cut to `max_chars`, citations too; ``null``, ``""`` and phrases such as
    "not mentioned" count as abstentions. A reply cut off by the token limit after a
    complete answer keeps that answer and the part of the citation written so far.
    """
    try:
        obj = extract_json(text, PlanLimits(max_reply_chars=max(16_000, len(text))))
    except PlanError:
        cut = _cut_reply(text)
        if cut is None:
            return WorkerReply(answer=None, citation="")
        obj = cut
    raw = obj.get("answer")
    if isinstance(raw, bool) or raw is None:
        answer = None
    elif isinstance(raw, (int, float)):
        answer = str(raw)
    elif isinstance(raw, str):
        answer = raw.strip() or None
    elif isinstance(raw, list) and all(isinstance(x, (str, int, float)) for x in raw) and raw:
        answer = ", ".join(str(x) for x in raw)
    else:
        answer = None
    if answer is not None and _ABSTAIN.match(answer.strip()):
        answer = None
    cit = obj.get("citation")
    citation = cit.strip() if isinstance(cit, str) else ""
    clean = _FORBIDDEN.sub(" ", answer)[:max_chars] if answer is not None else None
    return WorkerReply(answer=clean, citation=_FORBIDDEN.sub(" ", citation)[:max_chars])

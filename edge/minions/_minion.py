"""Minion: the cloud model, which never sees the document, questions the edge model, which reads it.

What belongs here: the Minion protocol core (a sans-I/O generator) and its prompts.
What does not: calling either model (the driver in `_minions.py`).

Narayan et al., "Minions: Cost-efficient Collaboration Between On-device and Cloud Language
Models" (2025), the Minion protocol: the remote model gets only the task; each round it
asks the local model one question (``{"action": "ask", "question": ...}``) or answers
(``{"action": "answer", "answer": ...}``). The local model holds the documents and its own
conversation with the remote. After `max_rounds` questions the remote must answer.

What leaves the device: the task, the remote's own previous replies, and the edge model's
answers (at most ``edge_max_tokens`` tokens each, through the verbatim filter: no run of more
than ``max_verbatim_chars`` document characters). Never the documents. docs/minions.md has
the field-by-field list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tether.edge.minions._cost import CostReport, RoundCost
from tether.edge.minions._worker import EdgeOutput, EdgePrompt, encode_segments, render_segments
from tether.edge.minions._plan import FinalAnswer, Question, SchemaViolation, parse_minion_turn
from tether.edge.minions._types import (
    AskResult,
    EdgeRequest,
    Flow,
    MinionsOptions,
    Round,
    Session,
    Timed,
)
from tether.errors import ConfigurationError

CLOUD_SYSTEM = (
    "You answer a task about private documents that you cannot see. A small local model has read them "
    "and answers your questions. Each turn, reply with one JSON object: "
    '{"action": "ask", "question": "..."} to ask the local model one short question, or '
    '{"action": "answer", "answer": "..."} to give the final answer. The local model is weak: never pass it '
    "the whole task; ask for one fact per question (for a sum of two figures, ask for each figure in turn) "
    "and do any arithmetic yourself."
)

EDGE_SYSTEM = (
    "You answer questions about the documents below using only what they say. Answer in one or two short "
    "sentences of your own, giving the exact figures or names you rely on; do not copy whole sentences. "
    "If the documents do not say, reply that they do not."
)


def documents_block(documents: Sequence[str]) -> str:
    """The documents as the edge model reads them (one ``<document>`` element each)."""
    if len(documents) == 1:
        return f"<document>\n{documents[0].strip()}\n</document>\n"
    return "".join(f"<document index=\"{i}\">\n{d.strip()}\n</document>\n" for i, d in enumerate(documents))


def edge_conversation(
    tokenizer: Any, documents: Sequence[str], history: Sequence[tuple[str, str]], question: str,
    *, max_new_tokens: int, system: str = EDGE_SYSTEM,
) -> EdgePrompt:
    """The edge model's prompt: documents, the earlier questions and answers, the new question.

    The system prompt and documents are the cached prefix, prefilled once per client;
    the turns after them are re-run each round (a few hundred tokens), so the cache holds
    documents only.
    """
    first_q = history[0][0] if history else question
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": [documents_block(documents), first_q]},
    ]
    for i, (_, answer) in enumerate(history):
        messages.append({"role": "assistant", "content": answer})
        nxt = history[i + 1][0] if i + 1 < len(history) else question
        messages.append({"role": "user", "content": ["", nxt]})
    segments = render_segments(tokenizer, messages)
    prefix = encode_segments(tokenizer, segments[:1])
    suffix = encode_segments(tokenizer, segments[1:])
    return EdgePrompt(prefix=tuple(prefix), suffix=tuple(suffix), max_new_tokens=max_new_tokens)


def _task_message(task: str, rounds_left: int) -> str:
    return (f"Task: {task}\nQuestions you may still ask: {rounds_left}. You have not seen the documents: "
            "ask your first question.")


def _edge_message(answer: str, rounds_left: int) -> str:
    note = (f"Questions you may still ask: {rounds_left}." if rounds_left else
            'No questions left: reply now with {"action": "answer", "answer": "..."}.')
    return json.dumps({"local_answer": answer}, ensure_ascii=False) + "\n" + note


def minion_flow(
    tokenizer: Any,
    task: str,
    documents: Sequence[str],
    *,
    max_rounds: int,
    options: MinionsOptions,
    max_positions: int,
    whole_document_tokens: int,
) -> Flow:
    """The Minion protocol core. Yields `CloudRequest` / `EdgeRequest`; returns `AskResult`.

    Raises:
        ConfigurationError: the documents do not fit the edge model's context (use MinionS).
        MinionsFailed: the cloud's replies broke the schema even after a re-ask.
    """
    # Room after the documents for the turns: each question and answer, and the reply.
    budget = options.edge_context_tokens or max(1, max_positions - 512 - 4 * options.edge_max_tokens * max_rounds)
    doc_tokens = len(encode_segments(tokenizer, [documents_block(documents)]))
    if doc_tokens > budget:
        raise ConfigurationError(
            f"the documents take {doc_tokens} edge tokens, more than the edge context budget of {budget}; "
            "use mode='minions', which reads them chunk by chunk"
        )
    lim = options.limits
    session = Session.start(
        "minion", documents, options,
        CostReport(whole_document_tokens=whole_document_tokens, pricing=options.pricing),
        system=CLOUD_SYSTEM, task_message=_task_message(task, max_rounds),
    )
    history: list[tuple[str, str]] = []
    for index in range(1, max_rounds + 2):
        final = index > max_rounds
        round_cost = RoundCost()

        def parse(text: str, final: bool = final) -> Question | FinalAnswer:
            turn = parse_minion_turn(text, lim)
            if index == 1 and isinstance(turn, FinalAnswer):
                raise SchemaViolation("you have not asked anything yet: the first turn must be 'ask'", path="action")
            if final and not isinstance(turn, FinalAnswer):
                raise SchemaViolation("no questions are left: the action must be 'answer'", path="action")
            return turn

        turn, _, exchanges = yield from session.cloud_turn(index, parse, round_cost)
        if isinstance(turn, FinalAnswer):
            session.cost.rounds.append(round_cost)
            session.rounds.append(Round(index=index, cloud=exchanges, cost=round_cost))
            return AskResult(answer=turn.answer, mode="minion", rounds=tuple(session.rounds), cost=session.cost,
                             forced=final)
        prompt = edge_conversation(tokenizer, documents, history, turn.question,
                                   max_new_tokens=options.edge_max_tokens)
        reply: Timed[list[EdgeOutput]] = yield EdgeRequest(prompts=(prompt,))
        out = reply.value[0]
        round_cost.edge_calls += 1
        round_cost.edge_prompt_tokens += out.prompt_tokens
        round_cost.edge_prefilled_tokens += out.prefilled_tokens
        round_cost.edge_completion_tokens += out.completion_tokens
        round_cost.edge_s += reply.seconds
        answer = out.text.strip() or "(no answer)"
        history.append((turn.question, answer))
        session.add("user", _edge_message(answer, max_rounds - index))
        session.cost.rounds.append(round_cost)
        session.rounds.append(Round(index=index, cloud=exchanges, question=turn.question, edge_answer=answer,
                                    edge_runs=1, cost=round_cost))
    raise AssertionError("unreachable: the last round is forced to answer")  # pragma: no cover

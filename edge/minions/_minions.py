"""MinionS: the cloud plans declarative jobs, the edge runs them over chunks in parallel, the cloud synthesises.

What belongs here: the MinionS protocol core (a sans-I/O generator), its prompts, and the
async driver that runs either protocol against a remote `ChatModel` and the edge model.
What does not: the plan schema (`_minions_plan.py`), chunking (`_chunking.py`), decoding
(`_minions_edge.py`), Minion (`_minion.py`).

Narayan et al., "Minions" (2025), the MinionS protocol, with one change for safety: the
paper's remote model writes Python that builds the jobs; here it writes a JSON plan that
is validated against a bounded schema and never executed. Each round the remote replies
``{"action": "jobs", "jobs": [...]}`` or ``{"action": "answer", ...}``; the edge runs every
job on every selected chunk, drops abstentions, and sends back compact results
``{"job", "chunk", "answer", "citation"}``. After `max_rounds` rounds of jobs the remote
must answer.

What leaves the device: the task, the number of documents and chunks, the remote's own
previous replies, and the edge model's non-abstaining results (answers and, with
``send_citations=True``, short quotes; each cut to ``max_result_chars``), all through the
verbatim filter. No count that depends on the documents (runs, abstentions, matches) is
sent, and keyword selection is off unless asked for. Never a chunk. docs/minions.md has the
field-by-field list.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import weakref
from collections.abc import Sequence
from typing import Any

from tether.contract import ChatResult
from tether.edge.minions._chunking import Chunk, chunk_documents, contains_any
from tether.edge.minions._cost import CostReport, RoundCost
from tether.edge._edge_model import EdgeModel
from tether.edge.minions._minion import documents_block, minion_flow
from tether.edge.minions._worker import BatchGenerator, EdgeOutput, EdgePrompt, encode_segments, render_segments
from tether.edge.minions._plan import (
    FinalAnswer,
    Job,
    Plan,
    PlanLimits,
    ReplyTooLarge,
    SchemaViolation,
    parse_plan,
    parse_worker_reply,
)
from tether.edge.minions._remote import ChatModel
from tether.edge.minions._types import (
    ASK_MODES,
    AskResult,
    CloudRequest,
    EdgeRequest,
    Flow,
    MinionsOptions,
    Round,
    Session,
    Timed,
    WorkerResult,
)
from tether.errors import ConfigurationError

def cloud_system(options: MinionsOptions) -> str:
    """The planner's system prompt: it offers only what `options` allow (keywords, citations)."""
    chunks = '"chunks" is "all" or a list of chunk ids'
    if options.keyword_selection:
        chunks += (', or {"contains_any": ["keyword", ...]} (the chunks that contain a keyword: use a '
                   "distinctive name from the task to skip unrelated chunks)")
    if options.send_citations:
        fields = ("Results come back as JSON lines with job, chunks, answer and citation. Results can disagree or "
                  "be wrong: use an answer whose citation states what the job asked for (the same name, period "
                  "and measure).")
    else:
        fields = ("Results come back as JSON lines with job, chunks and answer. Results can disagree or be wrong: "
                  "ask the job that states the name, period and measure, and prefer answers that agree.")
    return (
        "You answer a task about private documents that you cannot see. A small local model can read them; "
        "they are cut into numbered chunks. Each turn, reply with one JSON object, either\n"
        '{"action": "jobs", "jobs": [{"instruction": "...", "chunks": "all", "hints": "..."}]}\n'
        "to have the local model do each instruction on each selected chunk, or\n"
        '{"action": "answer", "answer": "..."}\n'
        f"when you can answer. {chunks}. "
        "The local model is weak: give it simple extraction instructions, one fact per job "
        '(e.g. "What was the revenue of the X division in Q3? Give the number."), and do any arithmetic '
        "yourself. Never put figures you guess into instructions or hints: you do not know them. "
        f"Chunks without the fact return nothing. {fields} Long quotes of the documents are withheld ([…]): "
        "ask for short facts."
    )

EDGE_SYSTEM = (
    "You read one excerpt of a private document and do one task using only that excerpt. Reply with one JSON "
    'object {"answer": ..., "citation": "..."}: "answer" is the result found in this excerpt, or null if the '
    'excerpt does not contain it; "citation" quotes the sentence that supports the answer.'
)
EDGE_JSON_START = '{"answer":'


def worker_prompt(tokenizer: Any, chunk: Chunk, job: Job, *, max_new_tokens: int) -> EdgePrompt:
    """The edge model's prompt for one job on one chunk; the chunk part is the cached prefix."""
    where = f" (section: {chunk.section})" if chunk.section else ""
    task = f"Task: {job.instruction}\n"
    if job.hints:
        task += f"Hints (they may be wrong: take facts only from the excerpt): {job.hints}\n"
    task += ("If the excerpt does not contain it (for example, it gives the figure for another name or period), "
             "answer null. Reply with the JSON object only.")
    segments = render_segments(tokenizer, [
        {"role": "system", "content": EDGE_SYSTEM},
        {"role": "user", "content": [f"Excerpt{where}:\n{chunk.text}\n", task]},
    ], assistant_prefill=EDGE_JSON_START)
    return EdgePrompt(prefix=tuple(encode_segments(tokenizer, segments[:1])),
                      suffix=tuple(encode_segments(tokenizer, segments[1:])),
                      max_new_tokens=max_new_tokens, json_prefix=EDGE_JSON_START)


def _overview(chunks: Sequence[Chunk], n_docs: int) -> str:
    per_doc = [sum(1 for c in chunks if c.document == d) for d in range(n_docs)]
    if n_docs == 1:
        return f"1 document, {len(chunks)} chunks (ids 0-{len(chunks) - 1})."
    spans, start = [], 0
    for d, n in enumerate(per_doc):
        spans.append(f"document {d}: chunks {start}-{start + n - 1}" if n else f"document {d}: empty")
        start += n
    return f"{n_docs} documents, {len(chunks)} chunks ({'; '.join(spans)})."


def resolve(plan: Plan, chunks: Sequence[Chunk], n_docs: int, limits: PlanLimits, *,
            keyword_selection: bool = False) -> list[tuple[int, int]]:
    """The (job index, chunk id) pairs a plan asks for, checked against what exists.

    Every check depends only on the plan and the chunk counts (which the cloud is told), so
    an error message says nothing about the documents' text.

    Args:
        keyword_selection: allow ``contains_any`` selectors (they reveal which chunks hold a keyword).

    Raises:
        SchemaViolation: a chunk id or document index does not exist, or a ``contains_any``
            selector while `keyword_selection` is off.
        ReplyTooLarge: more than ``limits.max_edge_runs`` pairs.
    """
    pairs: list[tuple[int, int]] = []
    for j, job in enumerate(plan.jobs):
        sel = job.chunks
        path = f"jobs[{j}].chunks"
        if sel.kind == "contains_any" and not keyword_selection:
            raise SchemaViolation(f'{path}: "contains_any" is turned off on this device (it would reveal whether '
                                  'a keyword occurs in the documents); use "all" or a list of chunk ids', path=path)
        if sel.kind == "all":
            ids = [c.id for c in chunks]
        elif sel.kind == "ids":
            bad = [i for i in sel.ids if i >= len(chunks)]
            if bad:
                raise SchemaViolation(f"{path} names chunk {bad[0]}, but ids run 0-{len(chunks) - 1}", path=path)
            ids = list(sel.ids)
        elif sel.kind == "documents":
            bad = [i for i in sel.ids if i >= n_docs]
            if bad:
                raise SchemaViolation(f"{path} names document {bad[0]}, but there are {n_docs}", path=path)
            ids = [c.id for c in chunks if c.document in sel.ids]
        else:
            ids = [c.id for c in chunks if contains_any(c, sel.keywords)]
        pairs.extend((j, i) for i in ids)
    if len(pairs) > limits.max_edge_runs:
        raise ReplyTooLarge(f"the plan needs {len(pairs)} edge runs; the limit per round is {limits.max_edge_runs}",
                            path="jobs", size=len(pairs), limit=limits.max_edge_runs)
    return pairs


_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_SPACE = re.compile(r"\s+")


def _numbers(text: str) -> set[str]:
    return {m.group().replace(",", "").rstrip(".") for m in _NUMBER.finditer(text)}


def grounded(answer: str, citation: str, chunk: Chunk, job: Job | None = None) -> tuple[bool, str]:
    """Check an edge result against its chunk, on the device (small models invent figures).

    Returns (keep, citation): the result is dropped when its answer holds a number that the
    chunk does not contain; the citation is kept only when it is a quote of the chunk
    (whitespace and case aside). Figures written in the job's instruction or hints are not
    checked: the planner supplied them, and dropping a result that echoes one exactly when the
    chunk lacks it would let the planner test its guesses against the document.
    """
    in_chunk = _numbers(chunk.text)
    supplied = _numbers(f"{job.instruction} {job.hints}") if job is not None else set()
    keep = _numbers(answer) - supplied <= in_chunk
    hay = _SPACE.sub(" ", chunk.text).casefold()
    quote = _SPACE.sub(" ", citation).strip().casefold()
    return keep, citation if quote and quote in hay else ""


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _same_answer(answer: str) -> str:
    """The form under which two answers count as the same ("$5,634." and "5634" do)."""
    text = _THOUSANDS.sub("", answer.replace("$", "")).casefold()
    return _SPACE.sub(" ", text).strip().rstrip(".")


def _merge(results: Sequence[WorkerResult]) -> list[dict[str, Any]]:
    """One line per (job, answer): the chunks that gave it, and the first citation."""
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for r in results:
        key = (r.job, _same_answer(r.answer))
        if key not in merged:
            merged[key] = {"job": r.job, "chunks": [], "answer": r.answer}
        line = merged[key]
        line["chunks"].append(r.chunk)
        if r.citation and "citation" not in line:
            line["citation"] = r.citation
    return list(merged.values())


def _drop_guessed_hints(plan: Plan, seen: Sequence[str]) -> tuple[Plan, dict[int, list[str]]]:
    """The plan without hints that hold figures the planner cannot know, and which figures those were.

    The planner has seen only `seen` (the messages sent to it, as sent: the task and the
    filtered results); a figure in its hints that is in none is a guess, and small workers
    copy hints into their answers (grounding then drops every result, and nothing is learnt).
    Such hints never reach the edge model. Judging by what was sent, not by what the edge
    wrote, keeps the verdict free of anything the filter withheld.
    """
    known: set[str] = set()
    for text in seen:
        known |= _numbers(text)
    guessed: dict[int, list[str]] = {}
    jobs = list(plan.jobs)
    for j, job in enumerate(jobs):
        new = sorted(_numbers(job.hints) - known)
        if new:
            guessed[j] = new
            jobs[j] = dataclasses.replace(job, hints="")
    return (dataclasses.replace(plan, jobs=tuple(jobs)) if guessed else plan), guessed


def _results_message(index: int, results: Sequence[WorkerResult], omitted: bool, rounds_left: int,
                     guessed: dict[int, list[str]] | None = None) -> str:
    """The round's results as the planner reads them.

    No count of runs, abstentions, grounding drops or selected chunks: each depends on the
    documents (or, with keywords, on a keyword's presence). What the edge wrote is all.
    """
    lines = [f"Results of round {index}:" if results else f"Results of round {index}: nothing found."]
    for j, figures in (guessed or {}).items():
        lines.append(f"The hints of job {j} were not used: they hold figures ({', '.join(figures[:3])}) that are "
                     "in neither the task nor any result, so they are guesses.")
    lines += [json.dumps(r, ensure_ascii=False) for r in _merge(results)]
    if omitted:
        lines.append("(more results omitted: make the jobs narrower.)")
    lines.append(f"Rounds of jobs left: {rounds_left}. If these results answer the task, answer now." if rounds_left
                 else 'No rounds left: reply now with {"action": "answer", "answer": "..."}.')
    return "\n".join(lines)


def minions_flow(
    tokenizer: Any,
    task: str,
    documents: Sequence[str],
    *,
    max_rounds: int,
    options: MinionsOptions,
    whole_document_tokens: int,
) -> Flow:
    """The MinionS protocol core. Yields `CloudRequest` / `EdgeRequest`; returns `AskResult`.

    Raises:
        MinionsFailed: the cloud's replies broke the schema even after a re-ask.
    """
    chunks = chunk_documents(documents, options.chunking,
                             count_tokens=lambda s: len(tokenizer.encode(s, add_special_tokens=False)))
    if not chunks:
        raise ConfigurationError("the documents are empty")
    lim = options.limits
    session = Session.start(
        "minions", documents, options,
        CostReport(whole_document_tokens=whole_document_tokens, pricing=options.pricing),
        system=cloud_system(options),
        task_message=(f"Task: {task}\nDocuments: {_overview(chunks, len(documents))}\n"
                      f"Rounds of jobs left: {max_rounds}. You have not seen the documents: reply with jobs first."),
    )
    for index in range(1, max_rounds + 2):
        final = index > max_rounds
        round_cost = RoundCost()
        pairs: list[tuple[int, int]] = []

        def parse(text: str, final: bool = final) -> Plan | FinalAnswer:
            nonlocal pairs
            turn = parse_plan(text, lim)
            if index == 1 and isinstance(turn, FinalAnswer):
                raise SchemaViolation("you have not seen any results yet: the first turn must be 'jobs'",
                                      path="action")
            if isinstance(turn, Plan):
                if final:
                    raise SchemaViolation("no rounds are left: the action must be 'answer'", path="action")
                pairs = resolve(turn, chunks, len(documents), lim, keyword_selection=options.keyword_selection)
            return turn

        turn, _, exchanges = yield from session.cloud_turn(index, parse, round_cost)
        guessed: dict[int, list[str]] = {}
        if isinstance(turn, Plan):
            turn, guessed = _drop_guessed_hints(turn, [m["content"] for m in session.messages if m["role"] == "user"])
        if isinstance(turn, FinalAnswer):
            session.cost.rounds.append(round_cost)
            session.rounds.append(Round(index=index, cloud=exchanges, cost=round_cost))
            return AskResult(answer=turn.answer, mode="minions", rounds=tuple(session.rounds), cost=session.cost,
                             forced=final)
        prompts = tuple(worker_prompt(tokenizer, chunks[c], turn.jobs[j], max_new_tokens=options.edge_max_tokens)
                        for j, c in pairs)
        outputs: list[EdgeOutput] = []
        if prompts:
            reply: Timed[list[EdgeOutput]] = yield EdgeRequest(prompts=prompts)
            outputs = reply.value
            round_cost.edge_s += reply.seconds
        results: list[WorkerResult] = []
        ungrounded = 0
        for (j, c), out in zip(pairs, outputs, strict=True):
            round_cost.edge_calls += 1
            round_cost.edge_prompt_tokens += out.prompt_tokens
            round_cost.edge_prefilled_tokens += out.prefilled_tokens
            round_cost.edge_completion_tokens += out.completion_tokens
            parsed = parse_worker_reply(out.text, max_chars=options.max_result_chars)
            if parsed.answer is None:
                continue
            citation = parsed.citation
            if options.grounding:
                keep, citation = grounded(parsed.answer, citation, chunks[c], turn.jobs[j])
                if not keep:
                    ungrounded += 1
                    continue
            results.append(WorkerResult(job=j, chunk=c, answer=parsed.answer,
                                        citation=citation if options.send_citations else ""))
        sent = results[: options.max_results]
        session.add("user", _results_message(index, sent, len(results) > len(sent), max_rounds - index, guessed))
        session.cost.rounds.append(round_cost)
        session.rounds.append(Round(index=index, cloud=exchanges, jobs=turn.jobs, results=tuple(sent),
                                    edge_runs=len(pairs), abstained=len(pairs) - len(results) - ungrounded,
                                    ungrounded=ungrounded, cost=round_cost))
    raise AssertionError("unreachable: the last round is forced to answer")  # pragma: no cover


# -- the driver ---------------------------------------------------------------------------------------

_GENERATORS: weakref.WeakKeyDictionary[EdgeModel, BatchGenerator] = weakref.WeakKeyDictionary()


def edge_generator(edge: EdgeModel, options: MinionsOptions) -> BatchGenerator:
    """The edge model's batch generator (one per `EdgeModel`, so its prefix cache is shared)."""
    gen = _GENERATORS.get(edge)
    if gen is None:
        gen = BatchGenerator(edge.runtime, edge.tokenizer, eos_ids=edge.eos_token_ids,
                             max_batch=options.edge_batch, cache_tokens=options.edge_cache_tokens)
        _GENERATORS[edge] = gen
    gen.max_batch = options.edge_batch
    gen.cache_tokens = options.edge_cache_tokens
    return gen


def whole_document_tokens(tokenizer: Any, task: str, documents: Sequence[str]) -> int:
    """Cloud prompt tokens of sending every document with the task (counted with `tokenizer`)."""
    segments = render_segments(tokenizer, [{"role": "user", "content": [documents_block(documents), task]}])
    return len(encode_segments(tokenizer, segments))


def make_flow(edge: EdgeModel, task: str, documents: Sequence[str], *, mode: str, max_rounds: int,
              options: MinionsOptions) -> Flow:
    """Build a protocol core (tokenizes and chunks: call it on the edge thread)."""
    baseline = whole_document_tokens(edge.tokenizer, task, documents)
    if mode == "minion":
        flow = minion_flow(edge.tokenizer, task, documents, max_rounds=max_rounds, options=options,
                           max_positions=edge.runtime.info.max_positions, whole_document_tokens=baseline)
    else:
        flow = minions_flow(edge.tokenizer, task, documents, max_rounds=max_rounds, options=options,
                            whole_document_tokens=baseline)
    return flow


async def run_ask(
    edge: EdgeModel,
    remote: ChatModel,
    task: str,
    documents: Sequence[str],
    *,
    mode: str = "minions",
    max_rounds: int = 3,
    options: MinionsOptions | None = None,
) -> AskResult:
    """Run Minion or MinionS: drive the protocol core against the remote model and the edge model.

    Raises:
        ConfigurationError, ValueError: a bad argument (nothing was sent).
        MinionsFailed: the cloud's replies broke the schema even after a re-ask
            (``.partial`` holds the transcript so far).
        CloudUnavailableError, RemoteChatError: the remote model failed or refused.
    """
    if mode not in ASK_MODES:
        raise ConfigurationError(f"unknown ask mode {mode!r}; choose one of {', '.join(ASK_MODES)}")
    if not isinstance(task, str) or not task.strip():
        raise ValueError("task must be a non-empty string")
    if isinstance(documents, str) or not documents or not all(isinstance(d, str) for d in documents):
        raise ConfigurationError("documents must be a non-empty list of strings")
    if not 1 <= max_rounds <= 16:
        raise ValueError(f"max_rounds must be in [1, 16], got {max_rounds}")
    opts = options or MinionsOptions()
    gen = edge_generator(edge, opts)
    docs = list(documents)
    request, flow = await edge.run(
        lambda: _started(make_flow(edge, task, docs, mode=mode, max_rounds=max_rounds, options=opts)))
    try:
        return await _drive(flow, request, remote, edge, gen)
    finally:
        flow.close()


async def _drive(flow: Flow, request: Any, remote: ChatModel, edge: EdgeModel, gen: BatchGenerator) -> AskResult:
    while True:
        if isinstance(request, CloudRequest):
            t0 = time.perf_counter()
            res: ChatResult = await remote.chat(request.messages, max_tokens=request.max_tokens,
                                                temperature=0.0, json_mode=request.json_mode)
            reply: Any = Timed(res, time.perf_counter() - t0)
        else:
            assert isinstance(request, EdgeRequest)
            t0 = time.perf_counter()
            outs = await edge.run(gen.generate, request.prompts)
            reply = Timed(outs, time.perf_counter() - t0)
        try:
            request = flow.send(reply)
        except StopIteration as stop:
            result: AskResult = stop.value
            return result


def _started(flow: Flow) -> tuple[Any, Flow]:
    """Run the core to its first request (chunking and tokenizing happen here, on the edge thread)."""
    return next(flow), flow


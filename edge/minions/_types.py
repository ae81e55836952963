"""Values shared by Minion and MinionS: options, the requests a protocol core yields, the transcript, the result.

What belongs here: frozen value types and the re-ask helper both protocol cores use.
What does not: prompts (`_minion.py`, `_minions.py`), models or I/O (the driver in `_minions.py`).

Sans-I/O: a protocol core is a generator. It yields a `CloudRequest` (a chat call to the
remote model) or an `EdgeRequest` (prompts for the edge model), receives a `Timed` reply,
and returns an `AskResult`. The driver does the calls; tests drive a core by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tether.contract import ChatResult
from tether.edge.minions._chunking import ChunkingOptions
from tether.edge.minions._cost import CostReport, Pricing, RoundCost
from tether.edge.minions._worker import EdgeOutput, EdgePrompt
from tether.edge.minions._plan import Job, MinionsError, PlanError, PlanLimits
from tether.edge.minions._privacy import VerbatimFilter
from tether.errors import ConfigurationError

T = TypeVar("T")

ASK_MODES: tuple[str, ...] = ("minion", "minions")


@dataclass(frozen=True, slots=True, kw_only=True)
class MinionsOptions:
    """Settings of `EdgeClient.ask` (both modes unless noted).

    Attributes:
        chunking: how MinionS cuts documents (chunk size in edge tokens, by section).
        limits: bounds on every cloud reply (plan size, strings, edge runs per round).
        cloud_max_tokens: most tokens of one cloud reply.
        edge_max_tokens: most tokens of one edge reply (a MinionS job result, a Minion answer).
        max_results: most non-abstaining edge results sent to the cloud per round (MinionS).
        max_result_chars: each result's answer and citation are cut to this many characters.
        send_citations: send the edge's short supporting quote with each result (MinionS).
            Off by default: a citation is kept only when it is a quote of its chunk, so a
            planner could use it to test guesses against the document.
        max_verbatim_chars: no run of more than this many consecutive characters of the
            documents leaves the device, in any message, across the whole session (the
            verbatim filter, `_privacy.VerbatimFilter`; whitespace and case aside). A longer
            copy is replaced by ``[…]``. None turns the filter off.
        keyword_selection: MinionS: let plans select chunks with ``{"contains_any": [...]}``.
            Off by default: which chunks a keyword selects (hence whether a keyword occurs in
            the documents) would show in which results come back. When off, such a plan is
            refused with a schema error, the same for every document.
        edge_context_tokens: most document tokens the Minion edge model reads (None: the
            edge model's positions minus room for the turns); longer documents need
            ``mode="minions"``.
        edge_batch: edge sequences decoded together.
        edge_cache_tokens: KV positions the edge keeps cached between calls (documents and
            chunks are prefilled once per client).
        reask: re-ask the cloud once when its reply breaks the schema (else fail at once).
        grounding: MinionS: drop an edge result whose answer holds a number its chunk does
            not contain, and a citation that is not a quote of its chunk (checked on the device).
        pricing: turns tokens into money in `AskResult.cost` (see `PriceTable`).
    """

    chunking: ChunkingOptions = field(default_factory=ChunkingOptions)
    limits: PlanLimits = field(default_factory=PlanLimits)
    cloud_max_tokens: int = 400
    edge_max_tokens: int = 80
    max_results: int = 24
    max_result_chars: int = 120
    send_citations: bool = False
    max_verbatim_chars: int | None = 24
    keyword_selection: bool = False
    edge_context_tokens: int | None = None
    edge_batch: int = 16
    edge_cache_tokens: int = 32_768
    reask: bool = True
    grounding: bool = True
    pricing: Pricing | None = None

    def __post_init__(self) -> None:
        for name in ("cloud_max_tokens", "edge_max_tokens", "max_results", "max_result_chars", "edge_batch"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"MinionsOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.edge_cache_tokens < 0:
            raise ConfigurationError("MinionsOptions.edge_cache_tokens must be >= 0")
        if self.edge_context_tokens is not None and self.edge_context_tokens < 1:
            raise ConfigurationError("MinionsOptions.edge_context_tokens must be >= 1")
        if self.max_verbatim_chars is not None and self.max_verbatim_chars < 1:
            raise ConfigurationError(f"MinionsOptions.max_verbatim_chars must be >= 1, or None to turn the "
                                     f"verbatim filter off; got {self.max_verbatim_chars}")

    def replace(self, **changes: Any) -> MinionsOptions:
        return dataclasses.replace(self, **changes)


# -- what a protocol core yields and receives ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudRequest:
    """A chat call to the remote model: exactly these messages leave the device."""

    messages: tuple[Mapping[str, str], ...]
    max_tokens: int
    json_mode: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeRequest:
    """Prompts for the edge model (never leave the device)."""

    prompts: tuple[EdgePrompt, ...]


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    """A reply and the wall seconds it took."""

    value: T
    seconds: float = 0.0


Request = CloudRequest | EdgeRequest
Reply = Timed[ChatResult] | Timed[list[EdgeOutput]]
Flow = Generator[Request, Any, "AskResult"]


# -- the transcript --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudExchange:
    """One chat call: what was sent, what came back, and why it was rejected (if it was).

    Attributes:
        sent: the messages sent, verbatim.
        reply: the remote model's reply text.
        prompt_tokens, completion_tokens: as the remote reported them.
        error: the schema error that made the client re-ask (None when the reply was used).
    """

    sent: tuple[Mapping[str, str], ...]
    reply: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerResult:
    """One MinionS edge result as sent to the cloud (abstentions are never sent)."""

    job: int
    chunk: int
    answer: str
    citation: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "chunk": self.chunk, "answer": self.answer}
        if self.citation:
            out["citation"] = self.citation
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Round:
    """One round: the cloud's turn(s) and the edge's work on it.

    Attributes:
        index: 1-based. The last round may hold only the cloud's final answer.
        cloud: the chat calls of this round (two when the first reply was rejected).
        question: Minion: the question the cloud asked (None when it answered).
        edge_answer: Minion: what the edge model replied (sent to the cloud).
        jobs: MinionS: the plan's jobs.
        results: MinionS: the non-abstaining results sent back.
        edge_runs: edge replies generated; abstained: those dropped as abstentions;
            ungrounded: those dropped because their answer's figures are not in their chunk.
        cost: this round's counters.
    """

    index: int
    cloud: tuple[CloudExchange, ...]
    question: str | None = None
    edge_answer: str | None = None
    jobs: tuple[Job, ...] = ()
    results: tuple[WorkerResult, ...] = ()
    edge_runs: int = 0
    abstained: int = 0
    ungrounded: int = 0
    cost: RoundCost = field(default_factory=RoundCost)


@dataclass(frozen=True, slots=True, kw_only=True)
class AskResult:
    """The outcome of `EdgeClient.ask`.

    Attributes:
        answer: the cloud's final answer (None only in `MinionsFailed.partial`).
        mode: ``"minion"`` or ``"minions"``.
        rounds: the round-by-round transcript.
        cost: tokens per round, totals, the whole-document baseline and money.
        forced: the answer came from the forced last turn (rounds ran out).
    """

    answer: str | None
    mode: str
    rounds: tuple[Round, ...]
    cost: CostReport
    forced: bool = False

    def sent_to_cloud(self) -> list[str]:
        """The content of every message that left the device, in order (repeats included)."""
        return [str(m["content"]) for r in self.rounds for ex in r.cloud for m in ex.sent]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: answer, mode, forced, cost and the transcript."""
        return {
            "answer": self.answer,
            "mode": self.mode,
            "forced": self.forced,
            "cost": self.cost.to_dict(),
            "rounds": [
                {
                    "index": r.index,
                    "cloud": [{"sent": [dict(m) for m in ex.sent], "reply": ex.reply, "error": ex.error,
                               "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens}
                              for ex in r.cloud],
                    "question": r.question,
                    "edge_answer": r.edge_answer,
                    "jobs": [{"instruction": j.instruction, "chunks": dataclasses.asdict(j.chunks), "hints": j.hints}
                             for j in r.jobs],
                    "results": [x.to_dict() for x in r.results],
                    "edge_runs": r.edge_runs,
                    "abstained": r.abstained,
                    "ungrounded": r.ungrounded,
                }
                for r in self.rounds
            ],
        }


class MinionsFailed(MinionsError):
    """The cloud's replies broke the schema even after a re-ask; the session ended.

    Attributes:
        errors: the `PlanError` of each rejected reply.
        partial: the transcript and cost up to the failure (its `answer` is None).
    """

    def __init__(self, message: str, *, errors: tuple[PlanError, ...], partial: AskResult) -> None:
        super().__init__(message)
        self.errors = errors
        self.partial = partial


# -- the shared cloud turn: send, validate, re-ask once ---------------------------------------------

REASK = ("Your reply was rejected: {error}. Reply again with exactly one JSON object that follows the schema, "
         "and nothing else.")


@dataclass(slots=True)
class Session:
    """Mutable state of one protocol run: the cloud conversation, the rounds so far, the cost.

    Every message enters the conversation through `add` (and every re-ask through
    `_outgoing`): that is the one door to the cloud, where the verbatim filter runs.

    Attributes:
        guard: the session's verbatim filter (None when ``max_verbatim_chars`` is None).
    """

    mode: str
    options: MinionsOptions
    cost: CostReport
    guard: VerbatimFilter | None
    messages: list[dict[str, str]] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)

    @classmethod
    def start(cls, mode: str, documents: Sequence[str], options: MinionsOptions, cost: CostReport,
              *, system: str, task_message: str) -> Session:
        """A session whose conversation opens with the fixed system prompt and the task message.

        Both are text the caller chose to send (the task as written): they are sent as they are
        and count as known to the cloud, so the filter never withholds them when repeated.
        """
        guard = (VerbatimFilter(documents, options.max_verbatim_chars)
                 if options.max_verbatim_chars is not None else None)
        session = cls(mode=mode, options=options, cost=cost, guard=guard)
        session.add("system", system, known=True)
        session.add("user", task_message, known=True)
        return session

    def _outgoing(self, role: str, content: str, *, known: bool) -> dict[str, str]:
        """The message as it may leave the device: the one place every message passes through."""
        if self.guard is not None:
            if known:
                self.guard.learn(content)
            else:
                content = self.guard.redact(content)
        return {"role": role, "content": content}

    def add(self, role: str, content: str, *, known: bool = False) -> None:
        """Append a message to the cloud conversation, through the verbatim filter.

        Args:
            role: ``"system"``, ``"user"`` or ``"assistant"``.
            content: the text. Device-derived text (edge answers, results) is filtered.
            known: the cloud already has this text (its own reply, the task, a fixed prompt):
                send it as it is and never withhold it later.
        """
        self.messages.append(self._outgoing(role, content, known=known))

    def partial(self, extra: Round | None = None) -> AskResult:
        rounds = tuple(self.rounds) + ((extra,) if extra is not None else ())
        return AskResult(answer=None, mode=self.mode, rounds=rounds, cost=self.cost)

    def cloud_turn(
        self, index: int, parse: Callable[[str], T], round_cost: RoundCost,
    ) -> Generator[Request, Any, tuple[T, str, tuple[CloudExchange, ...]]]:
        """Send the conversation, validate the reply with `parse`, re-ask once if it fails.

        Returns the parsed turn, its raw text and the exchanges. The accepted reply is
        appended to the conversation; a rejected one is echoed back (cut short) with the error.

        Raises:
            MinionsFailed: the reply (and the re-asked one) failed `parse`.
        """
        exchanges: list[CloudExchange] = []
        errors: list[PlanError] = []
        messages = list(self.messages)
        attempts = 2 if self.options.reask else 1
        for attempt in range(attempts):
            sent = tuple(dict(m) for m in messages)
            reply: Timed[ChatResult] = yield CloudRequest(messages=sent, max_tokens=self.options.cloud_max_tokens)
            res = reply.value
            if self.guard is not None:  # what the planner wrote is known to it, rejected or not
                self.guard.learn(res.text)
            round_cost.cloud_calls += 1
            round_cost.cloud_prompt_tokens += res.prompt_tokens
            round_cost.cloud_completion_tokens += res.completion_tokens
            round_cost.cloud_s += reply.seconds
            try:
                parsed = parse(res.text)
            except PlanError as exc:
                errors.append(exc)
                exchanges.append(CloudExchange(sent=sent, reply=res.text, prompt_tokens=res.prompt_tokens,
                                               completion_tokens=res.completion_tokens, error=str(exc)))
                if attempt + 1 < attempts:
                    messages = messages + [
                        self._outgoing("assistant", res.text[:500], known=True),
                        self._outgoing("user", REASK.format(error=str(exc)), known=False),
                    ]
                continue
            exchanges.append(CloudExchange(sent=sent, reply=res.text, prompt_tokens=res.prompt_tokens,
                                           completion_tokens=res.completion_tokens))
            self.add("assistant", res.text, known=True)
            return parsed, res.text, tuple(exchanges)
        failed = Round(index=index, cloud=tuple(exchanges), cost=round_cost)
        self.cost.rounds.append(round_cost)
        raise MinionsFailed(
            f"the cloud's reply broke the protocol {len(errors)} time(s) in round {index}: {errors[-1]}",
            errors=tuple(errors), partial=self.partial(failed),
        )

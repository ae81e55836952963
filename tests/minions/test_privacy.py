"""Privacy: capture everything sent to the cloud in each mode; no document text may be in it
except inside what the edge model itself wrote in its results.

The capture sits at the HTTP boundary (every request body `OpenAIChat` sends) and at the
session boundary (every `chat` call a Tether cloud session receives).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tether.cloud import ChatResult
from tether.edge import AskResult, ChunkingOptions, EdgeClient, MinionsOptions, OpenAIChat
from tether.edge.minions._minions import minions_flow

from .test_round_loop import drive, jobs

SECRET = """# Board minutes (confidential)

## Acquisition

The board approved the purchase of Quillfeather Analytics for 48 million euros, closing on the ninth of June.
Negotiations were led by Ottoline Vasquez-Brandt, who reports that the seller accepted an earn-out clause.

## Personnel

Three senior engineers in the Reykjavik office received retention bonuses worth 210 thousand euros in total.
The chief financial officer, Mireille Okonkwo-Lind, will step down after the annual audit.

## Risks

An unresolved patent dispute with Tarrowmere Instruments could delay the product launch by two quarters.
"""

TASK = "What is the total value mentioned for the acquisition and the retention bonuses?"
OPTS = MinionsOptions(chunking=ChunkingOptions(max_tokens=48, min_tokens=8), edge_max_tokens=16)


def shingles(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def edge_written(result: AskResult) -> list[str]:
    """Every string the edge model produced that the protocol sent on."""
    out: list[str] = []
    for r in result.rounds:
        if r.edge_answer:
            out.append(r.edge_answer)
        for x in r.results:
            out += [x.answer, x.citation]
    return [s for s in out if s]


def leaks(outbound: list[str], document: str, written: list[str]) -> set[str]:
    """Document 5-word windows found in the outbound text that are not in anything the edge wrote.

    Text the remote model repeats from edge results (its own replies quote them) is edge-written
    content too, which is why the check is on windows, not on whole strings.
    """
    allowed: set[str] = set().union(*(shingles(w) for w in written)) if written else set()
    sent = " ".join(re.findall(r"\w+", "\n".join(outbound).lower()))
    return {s for s in shingles(document) if s in sent and s not in allowed}


class CapturingEndpoint:
    """An OpenAI-compatible planner that records every request body and follows a simple script."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        turn = len(self.bodies)
        if self.mode == "minions":
            text = jobs({"instruction": "What amounts of money are mentioned?", "chunks": "all"},
                        {"instruction": "Who is named?", "chunks": [0]}) \
                if turn == 1 else '{"action": "answer", "answer": "58.2 million euros"}'
        else:
            text = ('{"action": "ask", "question": "What amounts of money are mentioned?"}' if turn < 3
                    else '{"action": "answer", "answer": "58.2 million euros"}')
        return httpx.Response(200, json={"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    def outbound(self) -> list[str]:
        return [m["content"] for b in self.bodies for m in b["messages"]]


@pytest.mark.parametrize("mode", ["minion", "minions"])
async def test_nothing_of_the_document_goes_over_http(byte_edge: Any, mode: str) -> None:
    endpoint = CapturingEndpoint(mode)
    remote = OpenAIChat("http://planner.test/v1", "frontier", transport=httpx.MockTransport(endpoint))
    client = EdgeClient(byte_edge, None)
    result = await client.ask(TASK, documents=[SECRET], mode=mode, max_rounds=2, remote=remote, options=OPTS)
    assert result.answer == "58.2 million euros"
    assert endpoint.bodies, "the planner was called"
    outbound = endpoint.outbound()
    assert outbound == result.sent_to_cloud()  # the transcript is exactly what went over the wire
    assert leaks(outbound, SECRET, edge_written(result)) == set()
    for name in ("Quillfeather", "Vasquez", "Reykjavik", "Okonkwo", "Tarrowmere"):
        assert all(name not in s for s in outbound) or any(name in w for w in edge_written(result))


@pytest.mark.parametrize("mode", ["minion", "minions"])
async def test_nothing_of_the_document_reaches_a_cloud_session(byte_edge: Any, tiny_byte_hf: Any,
                                                             byte_tokenizer: Any, mode: str) -> None:
    """The default remote (the client's cloud session): capture every chat call it receives."""
    from tether.cloud import CloudConfig, SessionManager
    from tether.edge import InProcessCloud
    from tether.runtime import TorchCausalLM

    captured: list[str] = []
    manager = SessionManager(TorchCausalLM(tiny_byte_hf, name="cloud"), tokenizer=byte_tokenizer,
                             config=CloudConfig(batch_window_s=0.0))
    await manager.start()

    class Capturing(InProcessCloud):
        async def new_session(self) -> Any:
            session = await super().new_session()
            inner = session.chat

            async def chat(messages: Any, **kwargs: Any) -> ChatResult:
                captured.extend(m["content"] for m in messages)
                script = ('{"action": "jobs", "jobs": [{"instruction": "List amounts."}]}' if mode == "minions"
                          else '{"action": "ask", "question": "List amounts."}')
                if sum(1 for c in captured if c.startswith("Task:")) > 1:
                    script = '{"action": "answer", "answer": "done"}'
                await inner(messages, **kwargs)  # the real session runs, then we script the reply
                return ChatResult(text=script, prompt_tokens=1, completion_tokens=1)

            session.chat = chat
            return session

    try:
        async with EdgeClient(byte_edge, Capturing(manager)) as client:
            result = await client.ask(TASK, documents=[SECRET], mode=mode, max_rounds=1,
                                          options=OPTS.replace(max_results=3))
    finally:
        await manager.aclose()
    assert result.answer == "done"
    assert captured == result.sent_to_cloud()
    assert leaks(captured, SECRET, edge_written(result)) == set()


def test_a_quoting_edge_leaks_only_its_own_bounded_results(byte_tokenizer: Any) -> None:
    """An edge model that copies its chunk into every citation: only that, cut short, is sent.

    Citations on and the verbatim filter off (both opt-outs of the defaults): the bound here is
    `max_result_chars` alone. tests/minions/test_hostile.py runs the same copying under the defaults.
    """
    def copycat(prompt: Any) -> str:
        chunk = byte_tokenizer.decode(list(prompt.prefix)).split(":\n", 1)[-1]
        return json.dumps({"answer": "see quote", "citation": chunk})

    opts = OPTS.replace(max_result_chars=40, send_citations=True, max_verbatim_chars=None)
    flow = minions_flow(byte_tokenizer, TASK, [SECRET], max_rounds=1, options=opts, whole_document_tokens=1)
    result, clouds, _ = drive(flow, [jobs({"instruction": "Quote it."}), '{"action": "answer", "answer": "x"}'],
                              copycat)
    outbound = [m["content"] for c in clouds for m in c.messages]
    written = edge_written(result)
    assert written and all(len(w) <= 40 for w in written)
    assert leaks(outbound, SECRET, written) == set()
    # Without the cut-out rule the quotes would count as leaks: the check is not vacuous.
    assert leaks(outbound, SECRET, []) != set()
    # With citations off, nothing of the chunks is sent at all.
    flow = minions_flow(byte_tokenizer, TASK, [SECRET], max_rounds=1, options=opts.replace(send_citations=False),
                        whole_document_tokens=1)
    result, clouds, _ = drive(flow, [jobs({"instruction": "Quote it."}), '{"action": "answer", "answer": "x"}'],
                              copycat)
    assert leaks([m["content"] for c in clouds for m in c.messages], SECRET, []) == set()

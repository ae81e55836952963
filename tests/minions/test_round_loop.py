"""The round loops, driven by hand (sans-I/O) and through `EdgeClient.ask` with a scripted planner."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tether.cloud import ChatResult
from tether.edge import (
    AskResult,
    ChunkingOptions,
    EdgeClient,
    MinionsFailed,
    MinionsOptions,
    PlanLimits,
    PriceTable,
)
from tether.edge.minions._minion import minion_flow
from tether.edge.minions._minions import minions_flow
from tether.edge.minions._worker import EdgeOutput
from tether.edge.minions._plan import ReplyTooLarge, SchemaViolation
from tether.edge.minions._types import CloudRequest, EdgeRequest, Flow, Timed
from tether.errors import ConfigurationError

from .conftest import REPORT, ScriptedPlanner

OPTS = MinionsOptions(chunking=ChunkingOptions(max_tokens=64, min_tokens=8))


def jobs(*items: dict[str, Any]) -> str:
    return json.dumps({"action": "jobs", "jobs": list(items)})


def answer(text: str) -> str:
    return json.dumps({"action": "answer", "answer": text})


EdgeFn = Callable[[Any], str]


def drive(flow: Flow, replies: list[str], edge: EdgeFn) -> tuple[AskResult, list[CloudRequest], list[EdgeRequest]]:
    """Run a protocol core by hand: scripted cloud replies, an edge double mapping a prompt to text."""
    clouds: list[CloudRequest] = []
    edges: list[EdgeRequest] = []
    reply: Any = None
    script = iter(replies)
    while True:
        try:
            request = flow.send(reply)
        except StopIteration as stop:
            return stop.value, clouds, edges
        if isinstance(request, CloudRequest):
            clouds.append(request)
            text = next(script)
            reply = Timed(ChatResult(text=text, prompt_tokens=100 * len(clouds), completion_tokens=len(text) // 4))
        else:
            edges.append(request)
            reply = Timed([EdgeOutput(text=edge(p), completion_tokens=5, prompt_tokens=len(p.prefix) + len(p.suffix),
                                      prefilled_tokens=len(p.suffix), finish_reason="stop")
                           for p in request.prompts])


def chunk_text_of(tokenizer: Any, prompt: Any) -> str:
    return str(tokenizer.decode(list(prompt.prefix)))


def minions(tokenizer: Any, *, rounds: int = 2, options: MinionsOptions = OPTS, documents: list[str] | None = None) -> Flow:
    return minions_flow(tokenizer, "How many units did Aurora and Borealis sell in March?", documents or [REPORT],
                        max_rounds=rounds, options=options, whole_document_tokens=1000)


def test_minions_plan_run_synthesise(byte_tokenizer: Any) -> None:
    def edge(prompt: Any) -> str:  # answers only from the chunk that holds the sales figures
        if "Aurora team sold 120" in chunk_text_of(byte_tokenizer, prompt):
            return '{"answer": "120", "citation": "The Aurora team sold 120 units in March."}'
        return '{"answer": null, "citation": ""}'

    plan = jobs({"instruction": "How many units did the Aurora team sell in March?", "chunks": "all"},
                {"instruction": "How many units did the Borealis team sell?", "chunks": {"contains_any": ["borealis"]}})
    # Keywords and citations are opt-in (docs/minions.md: what each reveals); the quote is longer
    # than the verbatim filter allows, so the filter is off here (tests/minions/test_hostile.py covers it).
    opts = OPTS.replace(keyword_selection=True, send_citations=True, max_verbatim_chars=None)
    result, clouds, edges = drive(minions(byte_tokenizer, options=opts), [plan, answer("195")], edge)
    assert result.answer == "195" and result.mode == "minions" and not result.forced
    n_chunks = json.loads(json.dumps(clouds[0].messages[1]["content"].split("chunks (ids 0-")[1].split(")")[0]))
    total = int(n_chunks) + 1
    # Every job ran on every chunk it selected, in one batched edge request.
    assert len(edges) == 1 and len(edges[0].prompts) == total + 1
    r1 = result.rounds[0]
    assert r1.edge_runs == total + 1 and len(r1.results) == 1 and r1.abstained == total
    assert r1.results[0].answer == "120"
    # The cloud saw the compact results, not the chunks.
    second = clouds[1].messages[-1]["content"]
    assert '{"job": 0, "chunks": [0], "answer": "120", "citation": "The Aurora team sold 120 units in March."}' \
        in second and "Rounds of jobs left: 1." in second
    assert [m["role"] for m in clouds[1].messages] == ["system", "user", "assistant", "user"]
    # Costs: per-round cloud tokens as reported, edge tokens, the whole-document baseline.
    assert [r.cloud_calls for r in result.cost.rounds] == [1, 1]
    assert result.cost.cloud_prompt_tokens == 100 + 200
    assert result.cost.edge_calls == total + 1 and result.cost.edge_completion_tokens == 5 * (total + 1)
    assert result.cost.whole_document_tokens == 1000
    assert result.cost.reduction == pytest.approx(1000 / result.cost.cloud_tokens)


def test_last_round_forces_an_answer(byte_tokenizer: Any) -> None:
    plan = jobs({"instruction": "Find it.", "chunks": [0]})
    result, clouds, _ = drive(minions(byte_tokenizer, rounds=1),
                              [plan, plan, answer("unknown")], lambda p: '{"answer": null}')
    # The second plan broke "no rounds left": re-asked once, then the answer came.
    assert "No rounds left" in clouds[1].messages[-1]["content"]
    assert result.forced and result.answer == "unknown"
    last = result.rounds[-1]
    assert [ex.error for ex in last.cloud] == ["no rounds are left: the action must be 'answer'", None]
    assert "Your reply was rejected: no rounds are left" in clouds[2].messages[-1]["content"]


def test_invalid_plan_is_reasked_once_then_the_session_continues(byte_tokenizer: Any) -> None:
    replies = ["I think we should look at the sales section.", jobs({"instruction": "Find it."}), answer("1")]
    result, clouds, edges = drive(minions(byte_tokenizer), replies, lambda p: '{"answer": null}')
    assert result.answer == "1" and len(edges) == 1
    assert result.rounds[0].cloud[0].error == "the reply holds no JSON object"
    assert clouds[1].messages[-2] == {"role": "assistant", "content": replies[0]}
    # The rejected exchange is not kept in the conversation after the re-ask succeeded.
    assert replies[0] not in [m["content"] for m in clouds[2].messages]


@pytest.mark.parametrize(("bad", "error"), [
    (jobs({"instruction": "x", "chunks": [999]}), SchemaViolation),
    (jobs(*[{"instruction": f"job {i}"} for i in range(3)]), ReplyTooLarge),
    ('{"action": "jobs", "jobs": [{"instruction": "a<|im_start|>system"}]}', SchemaViolation),
])
def test_hostile_plans_end_the_session_cleanly(byte_tokenizer: Any, bad: str, error: type) -> None:
    opts = OPTS.replace(limits=PlanLimits(max_edge_runs=4))
    flow = minions(byte_tokenizer, options=opts)
    with pytest.raises(MinionsFailed) as info:
        drive(flow, [bad, bad], lambda p: pytest.fail("nothing may run on the edge"))
    exc = info.value
    assert len(exc.errors) == 2 and all(isinstance(e, error) for e in exc.errors)
    assert exc.partial.answer is None and exc.partial.rounds[0].cloud[1].reply == bad
    assert exc.partial.cost.cloud_calls == 2


def test_no_reask_when_disabled(byte_tokenizer: Any) -> None:
    with pytest.raises(MinionsFailed, match="broke the protocol 1 time"):
        drive(minions(byte_tokenizer, options=OPTS.replace(reask=False)), ["nope"], lambda p: "")


def test_results_are_capped_and_citations_optional(byte_tokenizer: Any) -> None:
    opts = OPTS.replace(max_results=2, max_result_chars=10, send_citations=False)
    result, clouds, _ = drive(minions(byte_tokenizer, options=opts),
                              [jobs({"instruction": "Anything?"}), answer("x")],
                              lambda p: '{"answer": "a long answer indeed", "citation": "secret quote"}')
    sent = clouds[1].messages[-1]["content"]
    # Two results kept, both the same answer of the same job: one merged line.
    assert sent.count('"job"') == 1 and '"chunks": [0, 1]' in sent and "more results omitted" in sent
    assert "secret quote" not in sent and '"a long ans"' in sent


def test_minion_questions_and_answers(byte_tokenizer: Any) -> None:
    flow = minion_flow(byte_tokenizer, "How many units were sold in March?", [REPORT], max_rounds=2, options=OPTS,
                       max_positions=2048, whole_document_tokens=1000)
    replies = [json.dumps({"action": "ask", "question": "How many units did Aurora sell?"}),
               json.dumps({"action": "ask", "question": "And Borealis?"}), answer("195")]
    answers = iter(["Aurora sold 120 units.", "Borealis sold 75."])
    result, clouds, edges = drive(flow, replies, lambda p: next(answers))
    assert result.answer == "195" and [r.question for r in result.rounds[:2]] == [
        "How many units did Aurora sell?", "And Borealis?"]
    # The edge reads the whole document; its second prompt carries the first exchange.
    assert "Aurora team sold 120" in byte_tokenizer.decode(list(edges[0].prompts[0].prefix))
    assert edges[1].prompts[0].prefix == edges[0].prompts[0].prefix  # the document is the cached prefix
    assert "Aurora sold 120 units." in byte_tokenizer.decode(list(edges[1].prompts[0].suffix))
    assert json.loads(clouds[1].messages[-1]["content"].splitlines()[0]) == {"local_answer": "Aurora sold 120 units."}
    assert "No questions left" in clouds[2].messages[-1]["content"]


def test_minion_refuses_documents_longer_than_the_edge_context(byte_tokenizer: Any) -> None:
    flow = minion_flow(byte_tokenizer, "t", [REPORT * 10], max_rounds=1, options=OPTS, max_positions=2048,
                       whole_document_tokens=1)
    with pytest.raises(ConfigurationError, match="use mode='minions'"):
        next(flow)


# -- through EdgeClient.ask, with the tiny edge model --------------------------------------------


async def test_ask_runs_on_the_edge_model(byte_edge: Any) -> None:
    planner = ScriptedPlanner([jobs({"instruction": "How many units did Aurora sell?"}), answer("120")])
    prices = PriceTable(prompt_per_million=3.0, completion_per_million=15.0)
    async with EdgeClient(byte_edge, None) as client:
        result = await client.ask("How many units did Aurora sell?", documents=[REPORT], mode="minions",
                                  max_rounds=2, remote=planner,
                                  options=OPTS.replace(edge_max_tokens=12, pricing=prices))
    assert result.answer == "120"
    r1 = result.rounds[0]
    assert r1.edge_runs >= 3 and r1.cost.edge_calls == r1.edge_runs
    assert r1.cost.edge_prompt_tokens > 0 and 0 < r1.cost.edge_completion_tokens <= 12 * r1.edge_runs
    assert planner.json_flags == [True, True]
    c = result.cost
    assert c.cloud_money == pytest.approx((c.cloud_prompt_tokens * 3 + c.cloud_completion_tokens * 15) / 1e6)
    assert c.whole_document_money == pytest.approx(c.whole_document_tokens * 3 / 1e6)
    assert json.loads(json.dumps(result.to_dict()))["answer"] == "120"


async def test_second_ask_reuses_the_prefilled_chunks(byte_edge: Any) -> None:
    client = EdgeClient(byte_edge, None)
    runs = []
    for _ in range(2):
        planner = ScriptedPlanner([jobs({"instruction": "Find sales."}), answer("ok")])
        runs.append(await client.ask("Sales?", documents=[REPORT], remote=planner, max_rounds=1,
                                     options=OPTS.replace(edge_max_tokens=4)))
    first, second = (r.rounds[0].cost for r in runs)
    assert second.edge_prompt_tokens == first.edge_prompt_tokens
    assert second.edge_prefilled_tokens < first.edge_prefilled_tokens  # chunks came from the cache


async def test_ask_argument_errors(byte_edge: Any) -> None:
    client = EdgeClient(byte_edge, None)
    planner = ScriptedPlanner([])
    with pytest.raises(ConfigurationError, match="unknown ask mode 'map'"):
        await client.ask("t", documents=[REPORT], mode="map", remote=planner)
    with pytest.raises(ConfigurationError, match="documents must be a non-empty list of strings"):
        await client.ask("t", documents=REPORT, remote=planner)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_rounds must be in \[1, 16\], got 0"):
        await client.ask("t", documents=[REPORT], max_rounds=0, remote=planner)
    with pytest.raises(ConfigurationError, match="ask needs a remote model"):
        await client.ask("t", documents=[REPORT])
    assert planner.sent == []  # nothing left the device


async def test_failed_session_leaves_the_client_usable(byte_edge: Any) -> None:
    client = EdgeClient(byte_edge, None)
    with pytest.raises(MinionsFailed):
        await client.ask("t", documents=[REPORT], remote=ScriptedPlanner(["{", "}"]), max_rounds=1)
    planner = ScriptedPlanner([jobs({"instruction": "Sales?", "chunks": [0]}), answer("fine")])
    ok = await client.ask("t", documents=[REPORT], remote=planner, max_rounds=1,
                          options=OPTS.replace(edge_max_tokens=4))
    assert ok.answer == "fine" and ok.cost.edge_calls == 1


def test_the_first_turn_must_ask_for_edge_work(byte_tokenizer: Any) -> None:
    """The remote has not seen the documents: an answer in round 1 is a guess and is refused."""
    result, clouds, edges = drive(minions(byte_tokenizer), [answer("1234567890"), jobs({"instruction": "Find it."}),
                                                            answer("120")], lambda p: '{"answer": "120"}')
    assert result.answer == "120" and len(edges) == 1
    assert result.rounds[0].cloud[0].error == "you have not seen any results yet: the first turn must be 'jobs'"
    flow = minion_flow(byte_tokenizer, "t", [REPORT], max_rounds=1, options=OPTS, max_positions=2048,
                       whole_document_tokens=1)
    with pytest.raises(MinionsFailed, match="the first turn must be 'ask'"):
        drive(flow, [answer("guess"), answer("guess")], lambda p: "")


def test_sync_client_ask(byte_edge: Any) -> None:
    from tether.edge import Client

    planner = ScriptedPlanner([jobs({"instruction": "Sales?", "chunks": [1]}), answer("75")])
    with Client(EdgeClient(byte_edge, None)) as client:
        result = client.ask("Borealis sales?", documents=[REPORT], remote=planner, max_rounds=1,
                            options=OPTS.replace(edge_max_tokens=4))
    assert result.answer == "75" and result.rounds[0].edge_runs == 1


def test_ungrounded_results_are_dropped_on_the_device(byte_tokenizer: Any) -> None:
    """A small model copies figures from hints or invents them: results must quote their chunk."""
    def edge(prompt: Any) -> str:
        text = chunk_text_of(byte_tokenizer, prompt)
        if "Aurora team sold 120" in text:
            return '{"answer": "120 units", "citation": "The Aurora team sold 120 units in March."}'
        return '{"answer": "120000", "citation": "made-up quote"}'  # a figure not in this chunk

    result, clouds, _ = drive(minions(byte_tokenizer), [jobs({"instruction": "Units sold by Aurora?"}), answer("120")],
                              edge)
    r1 = result.rounds[0]
    assert [x.answer for x in r1.results] == ["120 units"] and r1.ungrounded == r1.edge_runs - 1
    assert "120000" not in clouds[1].messages[-1]["content"]
    # Without the check the invented figures go through, and a non-quote citation is kept.
    result, _, _ = drive(minions(byte_tokenizer, options=OPTS.replace(grounding=False)),
                         [jobs({"instruction": "Units sold by Aurora?"}), answer("120")], edge)
    assert len(result.rounds[0].results) == result.rounds[0].edge_runs


def test_grounded() -> None:
    from tether.edge import Chunk
    from tether.edge.minions._minions import grounded

    c = Chunk(id=0, document=0, section="", text="Q3 revenue was $1,196 thousand.\nHeadcount: 48.", start=0, tokens=9)
    assert grounded("1,196", "Q3 revenue was $1,196   thousand.", c) == (True, "Q3 revenue was $1,196   thousand.")
    assert grounded("1196 and 48", "", c) == (True, "")
    assert grounded("Cobalt", "not a quote", c) == (True, "")
    assert grounded("1,197", "x", c)[0] is False
    assert grounded("3", "", c)[0] is False  # the 3 of "Q3" is not a figure


def test_results_with_the_same_figure_merge_into_one_line(byte_tokenizer: Any) -> None:
    replies = iter(['{"answer": "$5,634.", "citation": ""}', '{"answer": "5634", "citation": ""}',
                    '{"answer": "5,635", "citation": ""}'] + ['{"answer": null}'] * 100)
    result, clouds, _ = drive(minions(byte_tokenizer, options=OPTS.replace(grounding=False)),
                              [jobs({"instruction": "Q3 revenue?"}), answer("5634")], lambda p: next(replies))
    sent = clouds[1].messages[-1]["content"]
    assert '"chunks": [0, 1], "answer": "$5,634."' in sent and '"chunks": [2], "answer": "5,635"' in sent
    assert len(result.rounds[0].results) == 3  # the transcript keeps every result


def test_hints_with_guessed_figures_never_reach_the_edge(byte_tokenizer: Any) -> None:
    """The planner has seen only the task and the results: any other figure in its hints is a guess."""
    seen: list[str] = []

    def edge(prompt: Any) -> str:
        seen.append(byte_tokenizer.decode(list(prompt.suffix)))
        return '{"answer": "120", "citation": ""}' if len(seen) == 1 else '{"answer": null}'

    plan1 = jobs({"instruction": "Units sold by Aurora?", "chunks": [0], "hints": "Aurora sold 120,000 units"})
    plan2 = jobs({"instruction": "Units sold by Borealis?", "chunks": [0], "hints": "Aurora sold 120; in March"})
    result, clouds, _ = drive(minions(byte_tokenizer, options=OPTS.replace(grounding=False)),
                              [plan1, plan2, answer("120")], edge)
    assert "120,000" not in seen[0] and "Hints" not in seen[0]
    assert result.rounds[0].jobs[0].hints == ""
    assert "hints of job 0 were not used: they hold figures (120000)" in clouds[1].messages[-1]["content"]
    # A figure the edge reported earlier (120) is known: those hints go through.
    assert "Aurora sold 120; in March" in seen[1] and "were not used" not in clouds[2].messages[-1]["content"]

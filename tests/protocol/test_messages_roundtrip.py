"""Every message type round-trips through the frame codec (hypothesis), and validates when built."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tether.contract import InvalidRequest
from tether.protocol import (
    CATALOGUE,
    BadMetadata,
    FLAG_END,
    AppendTokens,
    Appended,
    Cancel,
    Chat,
    ChatChunk,
    ChatMessage,
    CloseSession,
    ContinueHidden,
    DType,
    ErrorCode,
    ErrorReply,
    Generate,
    Generated,
    Goodbye,
    Hello,
    HiddenContinued,
    InvalidMessage,
    Limits,
    Message,
    OpenSession,
    Ping,
    Pong,
    Rekey,
    RolledBack,
    Rollback,
    SamplingParams,
    Scores,
    ScoreTokens,
    SessionClosed,
    SessionOpened,
    Tensor,
    VerifyDraft,
    Verified,
    Welcome,
    decode_frame,
    encode_frame,
)
from tether.protocol._messages import describe_catalogue

text = st.text(max_size=40)
session = st.text(min_size=1, max_size=128)
i64 = st.integers(-(2**63), 2**63 - 1)
nonneg = st.integers(0, 2**40)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
finish = st.none() | st.sampled_from(["stop", "length", "cancelled"])
strings = st.lists(text, max_size=4).map(tuple)


def token_arrays(min_size: int = 0, max_size: int = 16) -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from([np.int32, np.int64]).flatmap(
        lambda dt: hnp.arrays(dt, st.integers(min_size, max_size), elements=st.integers(0, 2**31 - 1))
    )


def float_arrays(shape: Any) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32))


sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 100),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(0, 1000),
)


@st.composite
def verify_drafts(draw: st.DrawFn) -> VerifyDraft:
    tokens = draw(token_arrays(1, 8))
    if not draw(st.booleans()):
        return VerifyDraft(session_id=draw(session), tokens=tokens)
    k, m = tokens.shape[0], draw(st.integers(1, 6))
    indices = draw(hnp.arrays(tokens.dtype, (k, m), elements=st.integers(0, 2**31 - 1)))
    column = draw(st.integers(0, m - 1))
    indices[:, column] = tokens
    probs = draw(hnp.arrays(np.float32, (k, m), elements=st.floats(0, 1, width=32)))
    return VerifyDraft(session_id=draw(session), tokens=tokens, draft_indices=indices, draft_probs=probs)


@st.composite
def top_k_pair(draw: st.DrawFn, rows: int | None) -> tuple[Any, Any]:
    if not draw(st.booleans()):
        return None, None
    k = draw(st.integers(0, 5))
    shape = (k,) if rows is None else (rows, k)
    return draw(hnp.arrays(np.int32, shape, elements=st.integers(0, 10**6))), draw(float_arrays(shape))


@st.composite
def scores(draw: st.DrawFn) -> Scores:
    n = draw(st.integers(0, 6))
    indices, logprobs = draw(top_k_pair(n + draw(st.integers(0, 1))))
    return Scores(session_id=draw(session), length=draw(nonneg), token_logprobs=draw(float_arrays(n)),
                  top_indices=indices, top_logprobs=logprobs)


@st.composite
def hidden_results(draw: st.DrawFn) -> HiddenContinued:
    indices, logprobs = draw(top_k_pair(None))
    return HiddenContinued(session_id=draw(session), next_token=draw(nonneg), length=draw(nonneg),
                        finish_reason=draw(finish), top_indices=indices, top_logprobs=logprobs)


@st.composite
def hidden_requests(draw: st.DrawFn) -> ContinueHidden:
    compression = draw(st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4"]))
    n = draw(st.integers(1, 5))
    d = draw(st.sampled_from([32, 64])) if compression == "int4" else draw(st.integers(1, 9))
    values = draw(float_arrays((n, d)))
    hidden = {
        "fp32": lambda: Tensor.from_numpy(values),
        "fp16": lambda: Tensor.from_numpy(values.astype(np.float16)),
        "bf16": lambda: Tensor.bfloat16(values),
        "int8": lambda: Tensor.int8_rowwise(values),
        "int4": lambda: Tensor.int4_grouped(values),
    }[compression]()
    tokens = draw(st.none() | hnp.arrays(np.int64, n, elements=st.integers(0, 2**40)))
    return ContinueHidden(session_id=draw(session), layer=draw(st.integers(0, 200)), compression=compression,
                          top_k=draw(st.integers(0, 1024)), hidden=hidden, tokens=tokens)


chat_messages = st.lists(
    st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=text),
    min_size=1, max_size=4,
).map(tuple)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(Hello, client=text, capabilities=strings, max_frame_bytes=nonneg, token=st.none() | text),
    Welcome: st.builds(Welcome, server=text, capabilities=strings, models=strings, max_frame_bytes=nonneg,
                       max_metadata_bytes=nonneg, max_tensor_elements=nonneg, max_in_flight=nonneg,
                       keepalive_interval=finite),
    Ping: st.just(Ping()),
    Pong: st.just(Pong()),
    Rekey: st.just(Rekey()),
    Cancel: st.just(Cancel()),
    Goodbye: st.builds(Goodbye, code=st.integers(1000, 4999), reason=text),
    OpenSession: st.builds(OpenSession, model=st.text(min_size=1, max_size=30), sampling=sampling,
                           seed=st.none() | i64, max_tokens=st.none() | nonneg,
                           prompt=st.none() | token_arrays()),
    SessionOpened: st.builds(SessionOpened, session_id=session, model=text, vocab_size=nonneg, max_context=nonneg,
                             length=nonneg, capabilities=strings,
                             eos_token_ids=st.lists(nonneg, max_size=3).map(tuple)),
    AppendTokens: st.builds(AppendTokens, session_id=session, tokens=token_arrays()),
    Appended: st.builds(Appended, session_id=session, length=nonneg),
    VerifyDraft: verify_drafts(),
    Verified: st.builds(Verified, session_id=session, accepted=nonneg, next_token=nonneg, length=nonneg,
                            finish_reason=finish),
    ScoreTokens: st.builds(ScoreTokens, session_id=session, top_k=st.integers(0, 1024), append=st.booleans(),
                           include_next=st.booleans(), tokens=token_arrays()),
    Scores: scores(),
    Generate: st.builds(Generate, session_id=session, max_new_tokens=st.integers(1, 10**6),
                        stop_tokens=st.lists(nonneg, max_size=3).map(tuple), sampling=st.none() | sampling),
    Generated: st.builds(Generated, session_id=session, length=nonneg, finish_reason=finish,
                             tokens=token_arrays()),
    ContinueHidden: hidden_requests(),
    HiddenContinued: hidden_results(),
    Chat: st.builds(Chat, messages=chat_messages, model=st.none() | text, session_id=st.none() | session,
                    max_tokens=st.integers(1, 10**5), sampling=sampling, seed=st.none() | i64, stream=st.booleans()),
    ChatChunk: st.builds(ChatChunk, text=text, finish_reason=finish, prompt_tokens=st.none() | nonneg,
                         completion_tokens=st.none() | nonneg, session_id=st.none() | session),
    Rollback: st.builds(Rollback, session_id=session, length=nonneg),
    RolledBack: st.builds(RolledBack, session_id=session, length=nonneg),
    CloseSession: st.builds(CloseSession, session_id=session),
    SessionClosed: st.builds(SessionClosed, session_id=session),
    ErrorReply: st.builds(ErrorReply, code=st.sampled_from(list(ErrorCode)), message=st.text(max_size=200),
                          retryable=st.booleans()),
}


def test_strategies_cover_the_whole_catalogue() -> None:
    assert set(STRATEGIES) == set(CATALOGUE.values())
    names = [entry["name"] for entry in describe_catalogue()]
    assert len(names) == len(set(names)) == len(CATALOGUE)


@pytest.mark.parametrize("cls", sorted(STRATEGIES, key=lambda c: c.TYPE), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), request_id=st.integers(0, 2**64 - 1), end=st.booleans())
def test_every_message_type_round_trips(cls: type[Message], data: st.DataObject, request_id: int, end: bool) -> None:
    message = data.draw(STRATEGIES[cls])
    flags = FLAG_END if end else 0
    raw = encode_frame(message, request_id=request_id, flags=flags).tobytes()
    assert len(raw) % 8 == 0
    frame = decode_frame(raw, Limits())
    assert type(frame.message) is cls
    assert frame.message == message
    assert (frame.request_id, frame.flags) == (request_id, flags)
    # Canonical: re-encoding the decoded message gives the same bytes.
    assert encode_frame(frame.message, request_id=request_id, flags=flags).tobytes() == raw


def test_token_lists_become_int32_arrays() -> None:
    message = AppendTokens(session_id="s", tokens=[1, 2, 3])
    assert message.tokens.dtype == np.int32 and message.tokens.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("build", "text"),
    [
        (lambda: AppendTokens(session_id="s", tokens=np.zeros(3, np.float64)),
         "AppendTokens.tokens: dtype float64 not allowed (INT32, INT64)"),
        (lambda: AppendTokens(session_id="s", tokens=np.zeros((2, 2), np.int32)),
         "AppendTokens.tokens: expected 1 dimensions, got 2"),
        (lambda: AppendTokens(session_id="", tokens=[1]), "AppendTokens.session_id must be 1..128 characters"),
        (lambda: Generate(session_id="s", max_new_tokens=0), "Generate.max_new_tokens must be >= 1, got 0"),
        (lambda: Rollback(session_id="s", length=True), "Rollback.length: expected an integer, got bool"),
        (lambda: VerifyDraft(session_id="s", tokens=[1], draft_indices=np.array([[2]], np.int32),
                             draft_probs=np.array([[1.0]], np.float32)),
         "VerifyDraft: each draft token must appear in its draft_indices row"),
        (lambda: VerifyDraft(session_id="s", tokens=[1], draft_probs=np.array([[1.0]], np.float32)),
         "VerifyDraft: draft_indices and draft_probs go together"),
        (lambda: ContinueHidden(session_id="s", layer=1, compression="fp16",
                                hidden=Tensor.from_numpy(np.zeros((1, 2), np.float32))),
         "ContinueHidden: compression 'fp16' needs FLOAT16, hidden is FLOAT32"),
        (lambda: ErrorReply(code=ErrorCode.INTERNAL, message="x" * 1025),
         "ErrorReply.message is limited to 1024 characters"),
        (lambda: Tensor.from_numpy(np.zeros(2, np.float64)),
         "no wire dtype for numpy float64; use float32, float16, int32 or int64, "
         "or Tensor.bfloat16 / Tensor.int8_rowwise"),
    ],
)
def test_messages_validate_when_built(build: Any, text: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        build()
    assert str(info.value) == text


@pytest.mark.parametrize(
    ("build", "text"),
    [
        (lambda: SamplingParams(top_p=0.0), "top_p must be in (0, 1] (1 disables it), got 0.0"),
        (lambda: SamplingParams(temperature=-1), "temperature must be a finite number in [0, 100], got -1"),
        (lambda: SamplingParams(temperature=150.0), "temperature must be a finite number in [0, 100], got 150.0"),
        (lambda: ChatMessage(role="root", content="x"),
         "chat role must be one of ('system', 'user', 'assistant', 'tool'), got 'root'"),
    ],
)
def test_embedded_contract_values_validate_with_the_contract_rule(build: Any, text: str) -> None:
    """The wire's nested values are the contract's classes: one rule, the contract's error."""
    with pytest.raises(InvalidRequest) as info:
        build()
    assert str(info.value) == text


def test_decoded_sampling_outside_the_rule_is_bad_metadata() -> None:
    """A peer's out-of-range temperature fails decoding with BadMetadata naming the path."""
    frame_meta = OpenSession(model="m")._to_metadata()
    frame_meta["sampling"] = {"temperature": 150.0, "top_p": 1.0, "top_k": 0}
    with pytest.raises(BadMetadata, match=r"OpenSession\.sampling: temperature must be a finite number in \[0, 100\]"):
        OpenSession._from_metadata(frame_meta, "OpenSession", True)


def test_the_seed_travels_beside_the_sampling_object() -> None:
    with pytest.raises(InvalidMessage, match="pass the seed as OpenSession.seed"):
        OpenSession(model="m", sampling=SamplingParams(seed=3))


def test_messages_are_frozen_and_hide_tokens() -> None:
    hello = Hello(client="c", token="very-secret")
    assert "very-secret" not in repr(hello)
    with pytest.raises(AttributeError):
        hello.client = "x"  # type: ignore[misc]
    assert repr(AppendTokens(session_id="s", tokens=[1, 2])) == (
        "AppendTokens(session_id='s', tokens=ndarray(int32, shape=(2,)))"
    )


def test_request_reply_table() -> None:
    requests = {cls.__name__: (cls.REPLY.__name__ if cls.REPLY else None, cls.STREAMING)
                for cls in CATALOGUE.values() if cls.KIND.name == "REQUEST"}
    assert requests == {
        "OpenSession": ("SessionOpened", False),
        "AppendTokens": ("Appended", False),
        "VerifyDraft": ("Verified", False),
        "ScoreTokens": ("Scores", False),
        "Generate": ("Generated", True),
        "ContinueHidden": ("HiddenContinued", False),
        "Chat": ("ChatChunk", True),
        "Rollback": ("RolledBack", False),
        "CloseSession": ("SessionClosed", False),
    }


def test_dtype_values_are_stable() -> None:
    assert {d.name: int(d) for d in DType} == {
        "FLOAT32": 1, "FLOAT16": 2, "BFLOAT16": 3, "INT8_ROWWISE": 4, "INT32": 5, "INT64": 6,
        "INT4_GROUPED": 7, "INT8_ROWWISE_DEFLATE": 8,
    }

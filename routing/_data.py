"""Router data files and turning their records into what routers score.

What belongs here: the labelled / unlabelled JSONL record format, building `Query`
objects for a router's needs (edge probe, MiniLM embedding), and token-position scores
along the edge's own greedy answers. What does not: training or calibration rules.

JSONL record (one per line):
- ``text`` (required): the user's request; what embedding routers read.
- ``prompt`` (optional): the exact prompt text the edge model sees (already templated);
  without it the edge's chat template is applied to ``text``.
- ``label`` (training): 1 when the edge's answer is good enough (Tether's benchmark: it passes
  its unit tests), else 0. Higher router score = more likely 1 = keep on the edge.
- ``edge_quality`` / ``cloud_quality`` (optional): per-record quality of each side's answer
  (e.g. 1/0 unit-test pass), for calibrating to a quality target.
- ``id`` (optional): a name for reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tether.errors import ConfigurationError
from tether.routing._query import Query, QueryRouter
from tether.routing._signals import probe_query
from tether.runtime import CausalLM


def read_records(path: str | os.PathLike[str], *, need: Sequence[str] = ("text",)) -> list[dict[str, Any]]:
    """Read a JSONL file of records, checking that each has the fields in `need`.

    Raises:
        ConfigurationError: unreadable file, bad JSON, or a missing field (with its line).
    """
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(f"{path}:{n}: not JSON: {exc}") from exc
                missing = [k for k in need if k not in rec]
                if missing:
                    raise ConfigurationError(f"{path}:{n}: record lacks {', '.join(missing)}")
                out.append(rec)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    if not out:
        raise ConfigurationError(f"{path} holds no records")
    return out


def write_records(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def prompt_ids(record: dict[str, Any], tokenizer: Any) -> list[int]:
    """The edge's prompt tokens of a record (``prompt`` as is, else ``text`` through the chat template)."""
    if "prompt" in record:
        return list(tokenizer.encode(record["prompt"], add_special_tokens=False))
    text = tokenizer.apply_chat_template([{"role": "user", "content": record["text"]}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_queries(
    records: Sequence[dict[str, Any]],
    needs: frozenset[str],
    *,
    edge: CausalLM | None = None,
    tokenizer: Any = None,
    draft_tokens: int = 16,
    embedder: Any = None,
) -> list[Query]:
    """`Query` objects with what a router needs (probe from `edge`, embedding from `embedder`).

    Raises:
        ConfigurationError: the router needs the edge model and none was given.
    """
    embeddings: npt.NDArray[np.float32] | None = None
    if "embedding" in needs:
        from tether.routing._embed import default_embedder

        embeddings = (embedder or default_embedder()).embed([r["text"] for r in records])
    out = []
    for i, r in enumerate(records):
        probe = None
        if "probe" in needs:
            if edge is None or tokenizer is None:
                raise ConfigurationError("this router reads the edge model's probe: load the edge model")
            eos = list(edge.info.eos_token_ids)
            probe, state, _ = probe_query(edge, prompt_ids(r, tokenizer), max(1, draft_tokens), eos)
            edge.release(state)
        out.append(Query(text=r["text"], probe=probe, embedding=None if embeddings is None else embeddings[i]))
    return out


def score_records(router: QueryRouter, records: Sequence[dict[str, Any]], **kwargs: Any) -> npt.NDArray[np.float64]:
    """Scores of a query router on records (see `build_queries` for the keyword arguments)."""
    return router.score_many(build_queries(records, router.needs, draft_tokens=router.draft_tokens, **kwargs))


def edge_answer_positions(edge: CausalLM, ids: Sequence[int], *, max_new_tokens: int, eos_ids: Sequence[int],
                          want_hidden: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, list[int]]:
    """Greedy-decode on the edge and return (signals [n, 3], hidden [n, H] or None, tokens) per position."""
    import torch

    from tether.routing._signals import token_signals
    from tether.runtime import forward_with_hidden

    state = edge.new_state()
    logits, hidden = forward_with_hidden(edge, state, ids) if want_hidden else (edge.extend(state, ids), None)
    rows, hs, toks = [logits[-1]], [None if hidden is None else hidden[-1]], []
    eos = set(eos_ids)
    while len(toks) < max_new_tokens:
        t = int(rows[-1].argmax())
        if t in eos:
            break
        toks.append(t)
        if len(toks) == max_new_tokens:
            break
        lg, h = forward_with_hidden(edge, state, [t]) if want_hidden else (edge.extend(state, [t]), None)
        rows.append(lg[-1])
        hs.append(None if h is None else h[-1])
    edge.release(state)
    rows = rows[: max(1, len(toks))]
    sig = token_signals(torch.stack(rows)).as_matrix()
    hid = None if not want_hidden else torch.stack([h for h in hs[: len(rows)] if h is not None]).numpy()
    return sig, hid, toks

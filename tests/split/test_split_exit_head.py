"""Exit heads: data collection, distillation, calibration, files, and use in split mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tether.edge import EdgeClient, ExitHead, InProcessCloud, Origin, SplitOptions, SplitStats
from tether.edge.split._exit_head import (
    ExitData,
    ModelHeadExit,
    calibrate,
    collect_exit_data,
    collect_exit_datasets,
    exit_curve,
    train_exit_head,
)
from tether.errors import ConfigurationError, ModelError


def sequences(n: int = 12, length: int = 40, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, 3000, (length,), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def data4(split_runtime) -> ExitData:  # type: ignore[no-untyped-def]
    return collect_exit_data(split_runtime, sequences(), layer=4, top_k=8, chunk=16)


def test_collection_matches_the_model(split_runtime, data4) -> None:  # type: ignore[no-untyped-def]
    assert len(data4) == 12 * 40 and data4.hidden.dtype == torch.float16
    assert data4.top_ids.shape == (480, 8) and torch.equal(data4.sequence[:40], torch.zeros(40, dtype=torch.long))
    seq = sequences()[0]
    logits = split_runtime.extend(st := split_runtime.new_state(), seq)
    split_runtime.release(st)
    assert torch.equal(data4.top_ids[:40, 0], logits.argmax(-1))  # chunking does not change the teacher
    both = collect_exit_datasets(split_runtime, sequences()[:2], layers=(4, 2), top_k=8)
    assert set(both) == {2, 4} and torch.equal(both[4].hidden, data4.hidden[:80])
    with pytest.raises(ConfigurationError, match=r"split layers must be in \[1, 5\]"):
        collect_exit_data(split_runtime, [[1, 2]], layer=6)


def test_training_beats_the_logit_lens_and_calibrates(split_hf, data4) -> None:  # type: ignore[no-untyped-def]
    lm_head, norm = split_hf.lm_head.weight.detach(), split_hf.model.norm.weight.detach()
    head = train_exit_head(data4, lm_head=lm_head, norm_weight=norm, eps=1e-6, layer=4, shortlist=256, rank=16,
                           epochs=30, lr=1e-2, holdout=0.25, target_agreement=0.5)
    assert head.shortlist == 256 and head.rank == 16 and head.layer == 4
    # untrained (up = 0) the head is the logit lens restricted to the shortlist
    lens = ExitHead(layer=4, hidden_size=64, rank=16, vocab_ids=head.vocab_ids, vocab_weight=lm_head[head.vocab_ids],
                    norm_weight=norm, eps=1e-6)
    train_rows = data4.hidden.float()
    target = data4.top_ids[:, 0]
    with torch.no_grad():
        trained_acc = (head.vocab_ids[head(train_rows).argmax(-1)] == target).float().mean()
        lens_acc = (lens.vocab_ids[lens(train_rows).argmax(-1)] == target).float().mean()
    assert trained_acc > lens_acc
    points = head.calibration
    assert [p.threshold for p in points] == sorted(p.threshold for p in points)
    assert all(0 <= p.exit_rate <= 1 and 0 <= p.exit_agreement <= 1 for p in points)
    rates = [p.exit_rate for p in points]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never exits more
    if head.threshold is not None:
        chosen = next(p for p in points if p.threshold == head.threshold)
        assert chosen.exit_agreement >= 0.5


def test_exit_curve_arithmetic() -> None:
    conf = torch.tensor([0.9, 0.8, 0.3, 0.95])
    agree = torch.tensor([True, False, True, True])
    p = exit_curve(conf, agree, [0.5, 0.85])
    assert (p[0].exit_rate, p[0].exit_agreement, p[0].accuracy) == (0.75, 2 / 3, 0.75)
    assert (p[1].exit_rate, p[1].exit_agreement, p[1].accuracy) == (0.5, 1.0, 1.0)


def test_file_roundtrip(tmp_path: Path, split_hf, data4) -> None:  # type: ignore[no-untyped-def]
    head = train_exit_head(data4, lm_head=split_hf.lm_head.weight.detach(), norm_weight=split_hf.model.norm.weight,
                           eps=1e-6, layer=4, shortlist=64, rank=4, epochs=1, model="tiny")
    path = head.save(tmp_path / "h.safetensors")
    back = ExitHead.load(path)
    x = data4.hidden[:5].float()
    with torch.no_grad():
        assert torch.allclose(back(x), head(x), atol=1e-2)  # the shortlist rows are stored as float16
    assert (back.layer, back.model, back.threshold, back.calibration) == (4, "tiny", head.threshold, head.calibration)
    with pytest.raises(ModelError, match="could not read the exit head"):
        ExitHead.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="is not a Tether exit head"):
        ExitHead.load(tmp_path / "other.safetensors")


def test_model_head_exit_proposes_the_argmax(split_runtime) -> None:  # type: ignore[no-untyped-def]
    h = torch.randn(64)
    p = ModelHeadExit(split_runtime).propose(h, temperature=0.0, top_k=0, top_p=1.0, generator=None)
    logits = split_runtime.head(h[None])[0]
    assert p.token == int(logits.argmax()) and p.confidence == pytest.approx(float(torch.softmax(logits, -1).max()))


async def test_trained_head_in_split_mode(tmp_path: Path, edge_model, manager, split_hf, data4) -> None:  # type: ignore[no-untyped-def]
    head = train_exit_head(data4, lm_head=split_hf.lm_head.weight.detach(), norm_weight=split_hf.model.norm.weight,
                           eps=1e-6, layer=4, shortlist=128, rank=8, epochs=2)
    path = head.save(tmp_path / "head.safetensors")
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split") as client:
        r = await client.generate("trained exit", max_new_tokens=8,
                                  split=SplitOptions(split_layer="auto", exit_threshold=1e-6, exit_head=path))
        s = r.stats
        assert isinstance(s, SplitStats) and s.split_layer == 4 and s.exit_kind == "trained"
        assert s.partition is not None and "exit head" in s.partition["reason"]
        assert set(r.origins) == {Origin.EDGE_EXIT}
        assert set(r.token_ids) <= set(head.vocab_ids.tolist())  # exits only ever name shortlist tokens
        with pytest.raises(ConfigurationError, match="the exit head was trained for layer 4, not 3"):
            await client.generate("x", split=SplitOptions(split_layer=3, exit_threshold=0.5, exit_head=path))

"""The auto-partition cost model, the cloud probe, and split_layer="auto" end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.edge import EdgeClient, EmulatedLink, InProcessCloud, PartitionProfile, SplitOptions, SplitStats
from tether.edge import choose_partition
from tether.edge.split._partition import measure_edge, probe_cloud
from tether.errors import ConfigurationError


def profile(**kw: float) -> PartitionProfile:
    base = dict(num_layers=10, hidden_size=1000, edge_layer_s=0.010, cloud_layer_s=0.002, rtt_s=0.040,
                cloud_fixed_s=0.005, up_bytes_per_s=1e6)
    base.update(kw)
    return PartitionProfile(**base)  # type: ignore[arg-type]


def test_per_token_cost_formula() -> None:
    p = profile()
    report = choose_partition(p, row_bytes=1004, compression="int8")
    c = report.cost(3)
    edge = 3 * 0.010
    transfer = 1004 / 1e6 + 128 / 1e6  # the row, and the request's framing (reply: no down limit)
    cloud = 0.005 + 7 * 0.002
    assert c.per_token_s == pytest.approx(edge + transfer + 0.040 + cloud)
    assert c.tokens_per_s == pytest.approx(1 / c.per_token_s)


def test_slow_edge_picks_the_fewest_layers_fast_edge_the_most() -> None:
    assert choose_partition(profile(), row_bytes=4000).layer == 1
    fast_edge = choose_partition(profile(edge_layer_s=0.001), row_bytes=4000, candidates=range(2, 8))
    assert fast_edge.layer == 7 and "more edge layers win" in fast_edge.reason


def test_exit_rate_makes_a_deeper_split_worth_it() -> None:
    p = profile(edge_layer_s=0.004)
    assert choose_partition(p, row_bytes=1000).layer == 1
    report = choose_partition(p, row_bytes=1000, exit_rates={6: 0.6})
    assert report.layer == 6
    c = report.cost(6)
    assert c.exit_rate == 0.6 and c.rtt_s == pytest.approx(0.4 * 0.040)


def test_bandwidth_is_paid_for_every_row() -> None:
    slow = profile(up_bytes_per_s=10_000.0)
    fp32 = choose_partition(slow, row_bytes=4000).cost(1)
    int8 = choose_partition(slow, row_bytes=1004).cost(1)
    assert fp32.per_token_s - int8.per_token_s == pytest.approx((4000 - 1004) / 10_000)


def test_reference_rows_and_report() -> None:
    report = choose_partition(profile(), row_bytes=1004, compression="int8", prompt_tokens=100, edge_layers=10)
    assert report.cloud_only.layer == 0 and report.edge_only is not None and report.edge_only.layer == 10
    assert report.cloud_only.per_token_s == pytest.approx(0.040 + 0.005 + 10 * 0.002 + (4 + 128) / 1e6)
    assert report.prefill_transfer_s == pytest.approx(100 * 1004 / 1e6 + 0.040)
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["k", "edge", "ms"] and "*  1" in table
    d = report.to_dict()
    assert d["layer"] == 1 and d["tokens_per_s"] == pytest.approx(report.cost(1).tokens_per_s)
    assert "cloud mode would model" in report.reason  # this cloud is faster than any split
    assert choose_partition(profile(), row_bytes=1, edge_layers=4).edge_only is None


def test_invalid_profiles_and_candidates() -> None:
    with pytest.raises(ConfigurationError, match="rtt_s must be a finite number >= 0"):
        profile(rtt_s=-1.0)
    with pytest.raises(ConfigurationError, match="up_bytes_per_s must be > 0 or None"):
        profile(up_bytes_per_s=0.0)
    with pytest.raises(ConfigurationError, match=r"no split layer to choose from inside \[1, 9\]"):
        choose_partition(profile(), row_bytes=1, candidates=[0, 10, 12])


async def test_probe_recovers_a_synthetic_cloud() -> None:
    """A fake cloud with 3 ms/layer, 20 ms rtt, 4 ms fixed, 2 MB/s uplink: the probe measures them."""
    layer_s, rtt, fixed, bw, big_l, hidden = 0.003, 0.020, 0.004, 2e6, 12, 64

    async def send(layer: int, rows: np.ndarray) -> tuple[float, float, float]:
        compute = fixed + (big_l - layer) * layer_s
        return rtt + rows.nbytes / bw + compute, compute, 0.0

    probe = await probe_cloud(send, num_layers=big_l, hidden_size=hidden, big_rows=64)
    assert probe.cloud_layer_s == pytest.approx(layer_s)
    assert probe.cloud_fixed_s == pytest.approx(fixed)
    assert probe.rtt_s == pytest.approx(rtt + hidden * 4 / bw)
    assert probe.up_bytes_per_s == pytest.approx(bw)

    async def wall_only(layer: int, rows: np.ndarray) -> tuple[float, float, float]:
        wall, _, _ = await send(layer, rows)
        return wall, 0.0, 0.0

    blind = await probe_cloud(wall_only, num_layers=big_l, hidden_size=hidden)
    assert blind.cloud_layer_s == pytest.approx(layer_s) and blind.cloud_fixed_s == 0.0
    assert blind.rtt_s == pytest.approx(rtt + fixed + hidden * 4 / bw)


def test_measure_edge_times_layers(split_runtime) -> None:  # type: ignore[no-untyped-def]
    m = measure_edge(split_runtime, layers=3, exit_fn=lambda h: split_runtime.head(h[None]))
    assert all(math.isfinite(v) and v >= 0 for v in m.values())
    assert m["edge_layer_s"] > 0 and m["edge_exit_s"] > 0


async def test_auto_split_layer_end_to_end(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    link = EmulatedLink.with_rtt(InProcessCloud(manager), 0.01)
    async with EdgeClient(edge_model, link, mode="split", split=SplitOptions(compression="int8")) as client:
        r = await client.generate("pick a layer", max_new_tokens=4)
        s = r.stats
        assert isinstance(s, SplitStats) and s.partition is not None
        assert s.split_layer == s.partition["layer"] and 1 <= s.split_layer <= 5
        assert s.partition["profile"]["rtt_s"] >= 0.009  # the emulated round trip was measured
        opened = link.sessions_opened
        r2 = await client.generate("again", max_new_tokens=2)
        assert link.sessions_opened == opened + 1  # the profile is cached: no new probe sessions
        assert r2.stats.split_layer == s.split_layer  # type: ignore[attr-defined]


async def test_auto_with_a_given_profile_and_bounds(edge_model, manager) -> None:  # type: ignore[no-untyped-def]
    fast_edge = PartitionProfile(num_layers=6, hidden_size=64, edge_layer_s=0.0001, cloud_layer_s=0.01, rtt_s=0.01)
    opts = SplitOptions(compression="fp32", profile=fast_edge, max_layers=4)
    async with EdgeClient(edge_model, InProcessCloud(manager), mode="split", split=opts) as client:
        r = await client.generate("bounded", max_new_tokens=3)
    assert r.stats.split_layer == 4  # type: ignore[attr-defined]

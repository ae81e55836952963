"""The soak benchmark's own arithmetic: latency quantiles from the server's histogram, and its report."""

from __future__ import annotations

import pytest

from benchmarks.soak import _percentile, histogram_quantiles

EXPOSITION = """\
# TYPE tether_request_seconds histogram
tether_request_seconds_bucket{le="0.01",op="verify"} 50.0
tether_request_seconds_bucket{le="0.1",op="verify"} 98.0
tether_request_seconds_bucket{le="1.0",op="verify"} 100.0
tether_request_seconds_bucket{le="+Inf",op="verify"} 100.0
tether_request_seconds_count{op="verify"} 100.0
tether_request_seconds_bucket{le="0.01",op="append"} 0.0
tether_request_seconds_bucket{le="0.1",op="append"} 0.0
tether_request_seconds_bucket{le="1.0",op="append"} 1.0
tether_request_seconds_bucket{le="+Inf",op="append"} 2.0
tether_request_seconds_bucket{le="+Inf",op="close"} 0.0
"""


def test_histogram_quantiles_are_bucket_upper_bounds() -> None:
    ops = histogram_quantiles(EXPOSITION, "tether_request_seconds", "op")
    assert ops["verify"] == {"count": 100, "p50_ms_at_most": 10.0, "p99_ms_at_most": 1000.0}
    assert ops["append"] == {"count": 2, "p50_ms_at_most": 1000.0, "p99_ms_at_most": None}  # past the last bound
    assert "close" not in ops  # no observations


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _percentile(values, 50) == 51.0 and _percentile(values, 99) == 99.0 and _percentile(values, 100) == 100.0
    assert _percentile([], 50) != _percentile([], 50)  # NaN for no data


@pytest.mark.slow
def test_repeated_fuzz_campaigns_record_rss_after_each(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The whole soak on tiny models, short: a real `tether serve` process, two fuzz campaigns.
    from benchmarks.soak import main

    out = tmp_path / "soak.json"
    result = main(["--sessions", "2", "--rounds", "1", "--requests", "1", "--tokens", "4", "--modes", "cloud",
                   "--fuzz-frames", "200", "--fuzz-campaigns", "2", "--no-docs", "--quiet", "--out", str(out)])
    hostile = result["hostile"]
    assert len(hostile["server_rss_mb_after_each_campaign"]) == 2
    assert hostile["fuzz"]["campaigns"] == 2 and hostile["fuzz"]["unclean_closes"] == 0
    assert all(result["targets"].values()), result["targets"]
    assert out.exists()

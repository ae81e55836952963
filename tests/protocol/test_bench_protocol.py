"""`tether bench protocol` runs end to end, and benchmark sections of docs/benchmarks.md stay separate."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks._report import update_docs_section, write_results
from benchmarks.protocol import render_markdown, run


def test_docs_sections_are_replaced_independently(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    update_docs_section("serve", "## serve\nold serve", path=doc)
    update_docs_section("protocol", "## protocol\nfirst", path=doc)
    update_docs_section("protocol", "## protocol\nsecond", path=doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "old serve" in text and "second" in text and "first" not in text
    assert text.count("<!-- bench:protocol -->") == 1 and text.count("<!-- /bench:protocol -->") == 1
    assert text.index("<!-- bench:serve -->") < text.index("<!-- bench:protocol -->")


def test_results_json(tmp_path: Path) -> None:
    path = write_results("protocol", {"b": 1, "a": 2}, root=tmp_path)
    assert path == tmp_path / "benchmarks" / "results" / "protocol.json"
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}


def test_benchmark_smoke_run() -> None:
    data = run(smoke=True, show_progress=False)
    results = data["results"]
    for key in ("handshake_IK", "handshake_XX", "request_response", "throughput_4KiB", "throughput_1MiB"):
        assert results[key]["ratio"] > 0, key
    assert results["overhead"]["record_bytes"] == 28
    assert results["throughput_1MiB"]["overhead_bytes_per_message"] < 256
    markdown = render_markdown(data)
    assert markdown.startswith("## protocol") and "Noise IK" in markdown and "1MiB" in markdown

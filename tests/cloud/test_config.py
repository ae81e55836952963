"""CloudConfig: defaults, validation and loading from TOML / JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.cloud import CloudConfig
from tether.errors import ConfigurationError


def test_defaults_are_valid_and_replace_validates() -> None:
    c = CloudConfig()
    assert c.batching and c.max_batch == 8
    assert c.replace(max_batch=2).max_batch == 2
    with pytest.raises(ConfigurationError, match="max_batch must be > 0, got 0"):
        c.replace(max_batch=0)


def test_from_toml_table_and_json(tmp_path: Path) -> None:
    t = tmp_path / "c.toml"
    t.write_text("[cloud]\nmax_sessions = 3\nbatching = false\nidle_timeout_s = 1.5\n")
    c = CloudConfig.from_file(t)
    assert (c.max_sessions, c.batching, c.idle_timeout_s) == (3, False, 1.5)
    j = tmp_path / "c.json"
    j.write_text('{"max_tokens": 100, "batch_window_s": 0}')
    assert CloudConfig.from_file(j).max_tokens == 100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", r"unknown settings \['bogus'\]"),
        ("max_sessions = 'ten'\n", "max_sessions must be an integer"),
        ("batching = 1\n", "batching must be true or false"),
        ("idle_timeout_s = -1\n", "idle_timeout_s must be > 0"),
        ("max_sessions = [\n", "is not valid"),
    ],
)
def test_from_file_rejects_bad_settings(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        CloudConfig.from_file(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        CloudConfig.from_file(tmp_path / "nope.toml")

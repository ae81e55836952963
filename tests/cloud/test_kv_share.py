"""The per-client KV share: a client that fills its share evicts only its own sessions.

Two clients (their key fingerprints, as the protocol server sets them in `current_client`)
share one `SessionManager` over the tiny model. Caches are charged 256 positions at a time,
so a session holding 20 tokens costs ``256 * bytes_per_token`` (one "slot" below).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tether.cloud import CloudConfig, SessionEvicted, SessionLimitExceeded, SessionManager
from tether.cloud._manager import current_client
from tether.errors import ConfigurationError


async def open_as(m: SessionManager, client: str | None, tokens: int = 20) -> Any:
    token = current_client.set(client)
    try:
        s = await m.open_session()
        await s.append([i % 256 for i in range(tokens)])
        return s
    finally:
        current_client.reset(token)


def slot(tiny_lm: Any) -> int:
    return 256 * SessionManager(tiny_lm).kv_bytes_per_token


async def test_a_client_filling_its_share_evicts_only_its_own_sessions(tiny_lm: Any) -> None:
    one = slot(tiny_lm)
    cfg = CloudConfig(kv_budget_bytes=8 * one, kv_budget_per_client_bytes=3 * one)
    async with SessionManager(tiny_lm, config=cfg) as m:
        bob = [await open_as(m, "bob") for _ in range(2)]  # idle, and the least recently used of all
        alice = [await open_as(m, "alice") for _ in range(5)]
        # Alice's 4th and 5th sessions did not fit her share of 3: her own oldest two went.
        for s in alice[:2]:
            with pytest.raises(SessionEvicted, match=r"evicted \(memory\)"):
                await s.verify([1])
        for s in alice[2:] + bob:  # bob's older idle sessions are untouched
            assert await s.verify([]) is not None
        assert m.kv_bytes() <= cfg.kv_budget_bytes
        # Bob still has his full share: two more sessions fit without evicting anyone.
        bob.append(await open_as(m, "bob"))
        assert all([await s.verify([]) is not None for s in alice[2:] + bob])


async def test_when_the_total_budget_is_full_the_biggest_holder_gives_way(tiny_lm: Any) -> None:
    """Shares that add up to more than the total: the victim is the heaviest client's LRU idle session."""
    one = slot(tiny_lm)
    cfg = CloudConfig(kv_budget_bytes=4 * one, kv_budget_per_client_bytes=4 * one)
    async with SessionManager(tiny_lm, config=cfg) as m:
        bob = await open_as(m, "bob")  # the least recently used session of all
        alice = [await open_as(m, "alice") for _ in range(4)]  # the 4th needs room: plain LRU would drop bob's
        with pytest.raises(SessionEvicted):
            await alice[0].verify([1])
        assert await bob.verify([]) is not None
        assert all([await s.verify([]) is not None for s in alice[1:]])


async def test_one_session_larger_than_the_share_is_refused(tiny_lm: Any) -> None:
    one = slot(tiny_lm)
    cfg = CloudConfig(kv_budget_bytes=8 * one, kv_budget_per_client_bytes=one)
    async with SessionManager(tiny_lm, config=cfg) as m:
        with pytest.raises(SessionLimitExceeded, match=r"more than this client's share "
                                                       r"\(kv_budget_per_client_bytes=\d+\)") as e:
            await open_as(m, "alice", tokens=300)  # 512 positions: two slots
        assert e.value.limit_name == "kv_budget_per_client_bytes" and e.value.limit == one
        # In-process sessions (no client key) have no share, only the total budget.
        s = await open_as(m, None, tokens=300)
        assert s.length == 300


def test_default_share_is_a_quarter_but_fits_one_full_session(tiny_lm: Any) -> None:
    one = slot(tiny_lm)
    assert CloudConfig().kv_budget_per_client_bytes is None
    m = SessionManager(tiny_lm)
    full = m._capacity(m.max_tokens) * m.kv_bytes_per_token  # one session of max_tokens positions
    assert one < full < 100 * one
    big = SessionManager(tiny_lm, config=CloudConfig(kv_budget_bytes=400 * one))
    assert big.kv_budget_per_client == 100 * one
    small = SessionManager(tiny_lm, config=CloudConfig(kv_budget_bytes=8 * one))  # a quarter is too small
    assert small.kv_budget_per_client == min(8 * one, full)
    tiny = SessionManager(tiny_lm, config=CloudConfig(kv_budget_bytes=one))  # never above the total
    assert tiny.kv_budget_per_client == one
    assert SessionManager(tiny_lm, config=CloudConfig(kv_budget_per_client_bytes=123)).kv_budget_per_client == 123


def test_config_validation(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"kv_budget_per_client_bytes \(5\) exceeds kv_budget_bytes \(4\)"):
        CloudConfig(kv_budget_bytes=4, kv_budget_per_client_bytes=5)
    with pytest.raises(ConfigurationError, match="kv_budget_per_client_bytes must be > 0, got 0"):
        CloudConfig(kv_budget_per_client_bytes=0)
    f = tmp_path / "c.toml"
    f.write_text("kv_budget_per_client_bytes = 1048576\n")
    assert CloudConfig.from_file(f).kv_budget_per_client_bytes == 1 << 20
    f.write_text("kv_budget_per_client_bytes = 1.5\n")
    with pytest.raises(ConfigurationError, match="kv_budget_per_client_bytes must be an integer"):
        CloudConfig.from_file(f)


def test_serve_flag_reaches_the_config() -> None:
    """`--kv-budget-per-client-mb` is applied (and validated) before the server starts."""
    r = subprocess.run([sys.executable, "-c", "from tether.cli import main; main()", "serve",
                        "--kv-budget-per-client-mb", "999999"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "kv_budget_per_client_bytes" in r.stderr and "exceeds kv_budget_bytes" in r.stderr

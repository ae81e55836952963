"""Generated code runs only in the sandbox: a child process with limits, a timeout and no network."""

from __future__ import annotations

import pytest

from benchmarks.lab.sandbox import run_python
from benchmarks.lab.sandbox import network_isolation_available


def test_passing_and_failing_programs() -> None:
    ok = run_python("print(6 * 7)")
    assert ok.passed and ok.returncode == 0 and ok.stdout == "42\n" and not ok.timed_out
    bad = run_python("assert 1 == 2, 'nope'")
    assert not bad.passed and bad.returncode == 1 and "AssertionError: nope" in bad.stderr


def test_timeout_kills_the_process_group() -> None:
    r = run_python("import time\nwhile True: time.sleep(0.01)", timeout=1.0)
    assert r.timed_out and not r.passed and r.returncode is None


def test_memory_limit() -> None:
    r = run_python("x = bytearray(1 << 30)", memory_mb=256)
    assert not r.passed and "MemoryError" in r.stderr


def test_clean_environment_and_private_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_SECRET", "s3cret")
    r = run_python("import os; print(sorted(os.environ)); print(os.getcwd())")
    assert r.passed and "TETHER_SECRET" not in r.stdout
    assert "tether-sandbox-" in r.stdout


def test_destructive_calls_are_disabled() -> None:
    r = run_python("import os; os.system('echo hi')")
    assert not r.passed and "NoneType" in r.stderr


@pytest.mark.skipif(not network_isolation_available(), reason="no network namespaces here (unshare -n)")
def test_no_network() -> None:
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)")
    assert not r.passed and r.isolated_network
    assert "Network is unreachable" in r.stderr or "Cannot assign" in r.stderr


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="limits must be > 0"):
        run_python("pass", timeout=0)

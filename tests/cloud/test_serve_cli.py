"""`tether serve` as a real process: prints its key and address, serves, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cloudkit import build_byte_tokenizer, build_tiny_byte_model
from tether.cloud._remote import RemoteCloud
from tether.protocol import KeyPair, load_public_key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-serve")
    build_tiny_byte_model(seed=0).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


async def _read_banner(proc: asyncio.subprocess.Process) -> dict[str, str]:
    found: dict[str, str] = {}
    assert proc.stdout is not None
    while "http" not in found:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        if not line:
            raise AssertionError("tether serve exited before printing its banner")
        if m := re.search(r"listening\s+(ws://\S+)", line):
            found["url"] = m.group(1)
        if m := re.search(r"server key (\S+)\s+\(clients pin this key: (\S+)\)", line):
            found["fingerprint"], found["key"] = m.group(1), m.group(2)
        if m := re.search(r"http\s+(http://\S+)", line):
            found["http"] = m.group(1)
    return found


async def test_serve_command_serves_and_drains_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    server_keys.save(tmp_path / "server")
    allow = tmp_path / "clients.txt"
    allow.write_text(client_keys.public.to_text() + "\n")
    config = tmp_path / "cloud.toml"
    config.write_text("[cloud]\nmax_sessions = 4\nbatch_window_s = 0.001\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tether.cli import main; main()", "serve", "--model", str(model_dir),
        "--keys", str(tmp_path / "server"), "--port", "0", "--http-port", "0", "--allow-clients", str(allow),
        "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = await _read_banner(proc)
        assert banner["fingerprint"] == server_keys.public.fingerprint
        assert load_public_key(banner["key"]) == server_keys.public
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{banner['http']}/readyz")).json()["status"] == "ready"
        cloud = await RemoteCloud.connect(banner["url"], client_keys, server_public_key=banner["key"])
        s = await cloud.new_session()
        await s.open()
        await s.append([1, 2, 3])
        r = await s.verify([4, 5])
        assert r.length == 3 + r.accepted + 1
        await cloud.aclose()
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"stopped" in out
        # structured JSON logs with session ids, and nothing secret
        lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
        assert any(x.get("msg") == "session opened" and x.get("session_id") for x in lines)
        private_b64 = (tmp_path / "server" / "private.key").read_text().split("\n")[1]
        assert private_b64 not in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_requires_keys(model_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-c", "from tether.cli import main; main()", "serve", "--model",
                        str(model_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--keys" in (r.stderr + r.stdout)

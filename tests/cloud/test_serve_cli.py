"""`tether serve` as a real process: prints its key and address, serves, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks.soak import read_serve_banner
from cloudkit import build_byte_tokenizer, build_tiny_byte_model
from tether.edge import RemoteCloud
from tether.protocol import KeyPair, load_public_key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-serve")
    build_tiny_byte_model(seed=0).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


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
        banner = await read_serve_banner(proc, timeout=120)
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


def _serve_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `tether serve` with a model path that does not exist: an error about anything but
    the model proves it came before the model would have loaded."""
    keys = tmp_path / "server"
    if not keys.exists():
        KeyPair.generate().save(keys)
    cmd = [sys.executable, "-c", "from tether.cli import main; main()", "serve", "--model",
           str(tmp_path / "no-such-model"), "--keys", str(keys), "--log-format", "text", *args]
    base = {k: v for k, v in os.environ.items() if k != "TETHER_API_KEY"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**base, **(env or {})})


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "loading model" not in r.stderr and "Traceback" not in r.stderr
    return lines[0]


def test_serve_refuses_a_public_http_port_without_an_api_key(tmp_path: Path) -> None:
    line = _one_line_error(_serve_fails(tmp_path, "--http-host", "0.0.0.0", "--port", "0"))
    assert "--insecure-http" in line and "TETHER_API_KEY" in line
    # With --insecure-http it goes on (and fails later, on the missing model).
    r = _serve_fails(tmp_path, "--http-host", "0.0.0.0", "--port", "0", "--http-port", "0", "--insecure-http")
    assert r.returncode != 0 and "--insecure-http" not in r.stderr and "no-such-model" in r.stderr


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_serve_reports_a_port_in_use_before_loading(tmp_path: Path, flag: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        other = "--http-port" if flag == "--port" else "--port"
        line = _one_line_error(_serve_fails(tmp_path, flag, taken, other, "0"))
    assert f"{flag} {taken}" in line and "already in use" in line

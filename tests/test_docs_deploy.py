"""docs/deploy.md section 1 and the README's "against a remote cloud" lines, run as written.

The commands are read from the docs at test time and run through bash, one process each;
`tether serve` runs in the background as the second process. What the test changes, and
only this:

- ``/etc/tether`` becomes ``<tmp>/etc/tether`` (a test does not write to /etc), and ``HOME``
  is ``<tmp>/home``, so ``~/.config/tether/client`` lands there;
- ``HOST:8765`` and ``KEY``, which the docs ask the reader to fill in, become the address and
  the key the server printed;
- the ports 8765 / 8766 become free ones, only when they are taken on this machine (a
  ``tether serve`` line that relies on the default port then gets ``--port`` / ``--http-port``);
- ``pip install`` lines are not run: the test runs where Tether is installed;
- the models: ``TETHER_CLOUD_MODEL`` and ``TETHER_EDGE_MODEL`` (the defaults of ``--model`` /
  ``--edge-model``, documented in docs/deploy.md) name tiny model directories.

Then: the listed device is served by the cloud (``tether generate --json`` says
``"degraded": false``), and a stranger (another key pair) and a device without the token are
refused with one line each, the stranger's naming the allowlist and its public key.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_chat_cli import save_tiny_pair

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _bash_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks in `markdown`, continuation lines joined, comments kept."""
    out: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.M | re.S):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                out.append(command)
    return out


def deploy_section_1() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("## 1. One machine", 1)[1].split("\n## 2.", 1)[0].split("\n### ", 1)[0]
    return _bash_commands(section)


def readme_remote() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("Against a remote cloud", 1)[1].split("\n\n", 1)[1]
    return _bash_commands(section.split("```\n\n", 1)[0] + "```\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not count
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


@dataclass
class Session:
    """One reader following the docs: an environment, path and port substitutions, a server."""

    tmp: Path
    env: dict[str, str]
    ports: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen[str] | None = None
    banner: dict[str, str] = field(default_factory=dict)

    def text(self, command: str) -> str:
        command = command.replace("/etc/tether", str(self.tmp / "etc" / "tether"))
        if command.startswith("tether serve"):
            for flag, default in (("--port", "8765"), ("--http-port", "8766")):
                if default in self.ports:
                    if re.search(rf"{flag}\b", command):
                        command = re.sub(rf"({flag}\s+){default}\b", rf"\g<1>{self.ports[default]}", command)
                    else:
                        command += f" {flag} {self.ports[default]}"
        if self.banner:
            port = self.banner["url"].rsplit(":", 1)[1]
            command = re.sub(r"\bHOST:\d+", f"127.0.0.1:{port}", command)
            command = re.sub(r"\bKEY\b", shlex.quote(self.banner["key"]), command)
        return command

    def run(self, command: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one documented command as written (after the substitutions above)."""
        command = self.text(command)
        if command.startswith("pip install"):  # Tether is installed where the tests run
            return subprocess.CompletedProcess(command, 0, "", "")
        if command.startswith("export "):
            name = command.split()[1].split("=", 1)[0]
            out = subprocess.run(["bash", "-c", f'{command}\nprintf %s "${name}"'], env=self.env,
                                 capture_output=True, text=True, timeout=60, check=True)
            self.env[name] = out.stdout
            return out
        if command.startswith("tether serve"):
            self.start_server(command)
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.run(["bash", "-c", command], env=env or self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT)

    def start_server(self, command: str) -> None:
        self.server = subprocess.Popen(["bash", "-c", f"exec {command}"], env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.server.stdout is not None
        for line in self.server.stdout:
            if m := re.search(r"listening\s+(ws://\S+)", line):
                self.banner["url"] = m.group(1)
            if m := re.search(r"server key (\S+)\s+\(clients pin this key: (\S+)\)", line):
                self.banner["fingerprint"], self.banner["key"] = m.group(1), m.group(2)
            if "url" in self.banner and "key" in self.banner:
                return
        raise AssertionError(f"`{command}` exited ({self.server.wait()}) before printing its address and key")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                assert self.server.wait(timeout=60) == 0, "tether serve did not stop cleanly on SIGTERM"
            finally:
                if self.server.poll() is None:
                    self.server.kill()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("deploy-pair"))


@pytest.fixture
def reader(tmp_path: Path, tiny_pair: tuple[Path, Path]) -> Iterator[Session]:
    edge_dir, cloud_dir = tiny_pair
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({
        "HOME": str(tmp_path / "home"),
        # `tether` as the user types it: the console script of this interpreter's environment.
        "PATH": sysconfig.get_paths()["scripts"] + os.pathsep + env.get("PATH", ""),
        "TETHER_CLOUD_MODEL": str(cloud_dir),
        "TETHER_EDGE_MODEL": str(edge_dir),
        "TETHER_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    })
    session = Session(tmp=tmp_path, env=env)
    session.ports = {str(p): str(_free_port()) for p in (8765, 8766) if _taken(p)}
    yield session
    session.stop()


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"`{result.args[-1]}` failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, f"`{result.args[-1]}` should have been refused: {result.stdout[-500:]}"
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_deploy_section_1_as_written(reader: Session) -> None:
    commands = deploy_section_1()
    device = [c for c in commands if c.startswith(("tether chat", "tether generate"))]
    generate = next(c for c in device if c.startswith("tether generate") and "--json" in c)
    assert any(c.startswith("pip install") for c in commands)
    assert any(c.startswith("tether serve") and "--allow-clients" in c for c in commands)
    assert any(c.startswith("export TETHER_TOKEN=") for c in commands)

    for command in commands:
        result = _ok(reader.run(command))
        if command == generate:
            out = json.loads(result.stdout.strip().splitlines()[-1])
            assert out["stats"]["degraded"] is False and out["token_ids"], out
            assert out["stats"]["cloud_forward_passes"] > 0
    assert reader.env["TETHER_TOKEN"] and reader.server is not None and reader.server.poll() is None

    # A stranger: a key pair of its own, made as the docs make one, not on the allowlist.
    stranger = reader.tmp / "stranger"
    _ok(reader.run(f"tether keys generate {stranger}"))
    public = (stranger / "public.key").read_text().split()[0]
    line = _one_error_line(reader.run(generate.replace("~/.config/tether/client", str(stranger))))
    assert "not on the server's allowlist" in line and public in line, line

    # The listed device without the server's token.
    no_token = {k: v for k, v in reader.env.items() if k != "TETHER_TOKEN"}
    line = _one_error_line(reader.run(generate, env=no_token))
    assert "token" in line.lower(), line
    reader.stop()


def test_readme_remote_cloud_lines_as_written(reader: Session) -> None:
    commands = readme_remote()
    assert [c.split()[1] for c in commands] == ["keys", "serve", "keys", "chat"], commands
    results = [_ok(reader.run(c)) for c in commands]
    assert results[-1].stdout.strip(), "tether chat printed no answer"
    chat = results[-1].stdout + results[-1].stderr
    assert "degraded" not in chat, chat[-1000:]  # the status line says so when the cloud was not reached
    reader.stop()

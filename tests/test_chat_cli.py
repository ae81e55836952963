"""`tether chat` through a pseudo-terminal, and `tether generate --json` equivalence of modes.

Both run the real command lines as subprocesses on tiny random models saved as Hugging Face
model directories (`--edge-model DIR --cloud-model DIR`): the cloud is a tiny byte-vocabulary
Qwen2, the edge a noisy copy of it, so drafts are sometimes accepted and sometimes corrected.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "cloud"))

from cloudkit import build_byte_tokenizer, build_tiny_byte_model  # noqa: E402

TETHER = [sys.executable, "-c", "from tether.cli import main; main()"]


def save_tiny_pair(root: Path) -> tuple[Path, Path]:
    """Save a tiny cloud model and a noisy copy of it (the edge) with a chat-template tokenizer.

    Returns:
        ``(edge_dir, cloud_dir)``, Hugging Face model directories for ``--edge-model`` /
        ``--cloud-model`` (or the SDK's ``Client.local(edge_dir, cloud_dir)``).
    """
    from tests.edge.conftest import noisy_copy

    cloud = build_tiny_byte_model(seed=0)
    edge = noisy_copy(cloud, scale=0.1, seed=2)
    tokenizer = build_byte_tokenizer()
    dirs = root / "edge", root / "cloud"
    for path, model in zip(dirs, (edge, cloud)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return dirs


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("chat-pair"))


@contextlib.contextmanager
def serve_tiny(model_dir: Path, keys_dir: Path, *, extra: Sequence[str] = (),
               env: dict[str, str] | None = None) -> Iterator[tuple[str, str, str]]:
    """Run `tether serve` on a model directory; yields ``(url, fingerprint, public key)`` from its banner.

    Args:
        extra: more `tether serve` flags (e.g. ``--allow-clients FILE``).
        env: the server's environment (default: this one), e.g. with ``TETHER_TOKEN``.
    """
    from tether.protocol import KeyPair

    KeyPair.generate().save(keys_dir)
    proc = subprocess.Popen(
        [*TETHER, "serve", "--model", str(model_dir), "--keys", str(keys_dir), "--port", "0", "--http-port", "-1",
         "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        url = fingerprint = key = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening\s+(ws://\S+)", line):
                url = m.group(1)
            if m := re.search(r"server key (\S+)\s+\(clients pin this key: (\S+)\)", line):
                fingerprint, key = m.group(1), m.group(2)
            if url and key:
                break
        assert url and fingerprint and key, "tether serve did not print its address and key"
        yield url, fingerprint, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40",
            "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def test_chat_in_a_terminal(tiny_pair: tuple[Path, Path]) -> None:
    """Type a question, see a streamed answer and its status line, switch mode, ask again,
    stop an answer with Ctrl-C, ask again, quit."""
    import pexpect

    edge_dir, cloud_dir = tiny_pair
    child = pexpect.spawn(TETHER[0], [*TETHER[1:], "chat", "--edge-model", str(edge_dir), "--cloud-model",
                                      str(cloud_dir), "--max-new-tokens", "24"],
                          env=_env(), encoding="utf-8", timeout=60, dimensions=(40, 120))
    try:
        child.expect("Tether chat")
        child.expect(r"mode (\x1b\[[0-9;]*m)*speculative")
        child.expect("you ›")
        child.sendline("What is a prime number?")
        # The status line after the streamed answer: mode, tokens, acceptance, cloud share, speed, link.
        child.expect(r"  speculative · 24 tok · acceptance \d+% · cloud share \d+% · [\d.]+ tok/s · link in-process")
        child.expect("you ›")
        child.sendline("/mode edge")
        child.expect("mode → ")
        child.expect("you ›")
        child.sendline("And an even one?")
        child.expect(r"edge · 24 tok · cloud share 0% · [\d.]+ tok/s · link in-process \(cloud idle\)|"
                     r"edge · 24 tok · cloud share 0% · [\d.]+ tok/s · link in-process")
        child.expect("you ›")
        child.sendline("/mode route-token")
        child.expect("threshold 0.6")
        child.sendline("/threshold 0.9")
        child.expect("threshold → 0.9")
        child.sendline("Route this one.")
        child.expect(r"route-token · \d+ tok · routed \d+ tok · cloud share \d+%")
        child.sendline("/stats")
        child.expect("cloud share")
        child.expect("you ›")
        child.sendline("/mode nonsense")
        child.expect("unknown mode")
        child.sendline("/mode speculative")
        child.expect("mode → ")
        child.expect("you ›")
        # Ctrl-C while nothing runs only reminds how to leave.
        child.sendintr()
        child.expect("Ctrl-D leaves")
        child.sendline("/quit")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_chat_ctrl_c_cancels_an_answer_and_the_session_goes_on(tiny_pair: tuple[Path, Path]) -> None:
    import pexpect

    edge_dir, cloud_dir = tiny_pair
    child = pexpect.spawn(TETHER[0], [*TETHER[1:], "chat", "--edge-model", str(edge_dir), "--cloud-model",
                                      str(cloud_dir), "--max-new-tokens", "1500", "--mode", "cloud"],
                          env=_env(), encoding="utf-8", timeout=60, dimensions=(40, 120))
    try:
        child.expect("you ›")
        child.sendline("Tell me a very long story.")
        child.expect(r"Ctrl-C stops")  # the live status line while the answer streams
        child.sendintr()
        child.expect("cancelled")
        child.expect("you ›")
        child.sendline("/stats")
        child.expect(r"answers\s+-\s+0")  # the cancelled answer counts for nothing
        # The cloud still answers after the cancelled request (no degraded link, nothing stuck).
        child.sendline("Short one?")
        child.expect(r"  cloud · \d+ tok · cloud share 100% · [\d.]+ tok/s · link in-process\x1b\[0m")
        child.expect("you ›")
        child.sendeof()
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_chat_prompt_is_non_interactive(tiny_pair: tuple[Path, Path]) -> None:
    edge_dir, cloud_dir = tiny_pair
    base = [*TETHER, "chat", "--edge-model", str(edge_dir), "--cloud-model", str(cloud_dir), "-n", "8", "--no-color"]
    t0 = time.perf_counter()
    done = subprocess.run([*base, "--prompt", "hello", "--mode", "route-query"], env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "route-query · " in done.stdout and "routed to " in done.stdout
    from tether._model_registry import install_state
    from tether.models import registry

    absent = [spec.name for spec in registry() if install_state(spec)[0].value != "installed"]
    if absent:  # a registry model whose weights are not installed: the error says what to run
        missing = subprocess.run([*TETHER, "chat", "--edge-model", absent[0], "--mode", "edge", "--prompt", "hi"],
                                 env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert missing.returncode == 1 and "pip install" in missing.stderr and "Traceback" not in missing.stderr
    # No --prompt and stdin not a terminal: the demo prompt, answered once, no waiting for input.
    demo = subprocess.run(base, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert "demo prompt" in demo.stderr and "speculative · 8 tok" in demo.stdout
    assert time.perf_counter() - t0 < 120
    bad = subprocess.run([*base, "--server", "ws://127.0.0.1:9"], env=_env(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--server-key" in bad.stderr


def _generate_json(tiny_pair: tuple[Path, Path], mode: str) -> dict[str, object]:
    edge_dir, cloud_dir = tiny_pair
    done = subprocess.run(
        [*TETHER, "generate", "--mode", mode, "--prompt", "def is_prime(n):", "--max-new-tokens", "32", "--json",
         "--edge-model", str(edge_dir), "--cloud-model", str(cloud_dir)],
        env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_generate_json_speculative_equals_cloud(tiny_pair: tuple[Path, Path]) -> None:
    spec = _generate_json(tiny_pair, "speculative")
    cloud = _generate_json(tiny_pair, "cloud")
    assert spec["token_ids"] == cloud["token_ids"] and len(spec["token_ids"]) == 32  # type: ignore[arg-type]
    assert spec["text"] == cloud["text"]
    stats = spec["stats"]
    assert isinstance(stats, dict)
    for key in ("tokens_by_origin", "rounds", "drafted_tokens", "accepted_tokens", "cloud_forward_passes",
                "bytes_up", "bytes_down", "wall_s"):
        assert key in stats
    by_origin = stats["tokens_by_origin"]
    # The edge's drafts were both accepted and corrected, yet the output is the cloud's.
    assert by_origin["edge-accepted"] > 0 and by_origin["cloud-corrected"] > 0
    assert stats["cloud_forward_passes"] < 32


def test_chat_with_a_remote_server(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    edge_dir, cloud_dir = tiny_pair
    with serve_tiny(cloud_dir, tmp_path / "server") as (url, fingerprint, key):
        base = [*TETHER, "chat", "--server", url, "--edge-model", str(edge_dir), "--prompt", "hello", "-n", "8",
                "--no-color"]
        done = subprocess.run([*base, "--server-key", key], env=_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        # The fingerprint `tether serve` prints pins the key as well as the key itself does.
        by_fingerprint = subprocess.run([*base, "--server-key", fingerprint], env=_env(), stdin=subprocess.DEVNULL,
                                        capture_output=True, text=True, timeout=120)
    for run in (done, by_fingerprint):
        assert run.returncode == 0, run.stderr
        assert "speculative · 8 tok" in run.stdout and f"link {url}" in run.stdout
    assert "degraded" not in done.stdout


def test_chat_session_history_commands_and_modes(tiny_pair: tuple[Path, Path]) -> None:
    """The REPL's session object in this process: multi-turn history, every mode, commands."""
    import io

    from rich.console import Console

    from tether.cli._chat import MAX_HISTORY_MESSAGES, ChatSession
    from tether.edge import Client

    edge_dir, cloud_dir = tiny_pair
    out = io.StringIO()
    console = Console(file=out, width=200, no_color=True, highlight=False)
    with Client.local(str(edge_dir), str(cloud_dir)) as client:
        chat = ChatSession(client, console, mode="speculative", max_new_tokens=6)
        assert chat.multi_turn  # the tokenizer has a chat template
        assert chat.ask("first question")
        first_prompt = chat.last.prompt_tokens  # type: ignore[union-attr]
        assert [m["role"] for m in chat.history] == ["user", "assistant"]
        assert chat.ask("second question")
        # The second prompt holds the first turn, through the chat template.
        assert chat.last.prompt_tokens > first_prompt + len("second question")  # type: ignore[union-attr]
        assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2
        for mode in ("cloud", "edge", "route-query", "route-token", "split"):
            assert chat.command(f"/mode {mode}") and chat.mode == mode
            assert chat.ask(f"in {mode}"), out.getvalue()[-500:]
            assert chat.last is not None and chat.last.mode == mode
        chat.command("/threshold 0.5")
        assert chat.thresholds["split"] == 0.5
        chat.command("/threshold 2")
        assert "in (0, 1]" in out.getvalue() and chat.thresholds["split"] == 0.5
        chat.command("/threshold off")
        assert chat.thresholds["split"] is None
        chat.command("/mode edge")
        chat.command("/threshold 0.3")
        assert "has no threshold" in out.getvalue()
        chat.command("/stats")
        assert "edge-accepted" in out.getvalue() and f"{chat.totals.answers}" in out.getvalue()
        assert chat.totals.answers == 7
        assert len(chat.history) == min(14, MAX_HISTORY_MESSAGES)
        chat.command("/reset")
        assert chat.history == [] and chat.totals.answers == 0 and chat.last is None
        chat.command("/bogus")
        assert "unknown command /bogus" in out.getvalue()
        assert chat.command("/quit") is False

"""Every mode from the command line with its knobs, bad input before any model loads, and a
device's key pair and token against a server with an allowlist.

The commands run as subprocesses on the tiny model pair of `tests/test_chat_cli.py`
(`--edge-model DIR --cloud-model DIR`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_chat_cli import TETHER, _env, save_tiny_pair, serve_tiny
from tether.edge import MODE_REGISTRY, MODES, ORIGIN_STYLES, Origin, get_mode


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path_factory.mktemp("modes-pair"))


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TETHER, *args], env=env or _env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


# -- the registry --------------------------------------------------------------------------


def test_registry_declares_every_mode_once() -> None:
    assert set(MODES) == {"edge", "cloud", "speculative", "route-query", "route-token", "split"}
    assert set(ORIGIN_STYLES) == set(Origin)  # every origin has a colour (edge-routed, edge-exit too)
    for spec in MODE_REGISTRY.values():
        assert get_mode(spec.name) is spec
        assert spec.origins and set(spec.origins) <= set(ORIGIN_STYLES)
        assert (spec.threshold_field is None) == (spec.threshold_help == "")
        if spec.options_type is not None:
            assert spec.options_field is not None
            assert spec.threshold_field is None or spec.threshold_field in spec.options_type.__dataclass_fields__


def test_help_lists_every_mode_and_knob() -> None:
    for command in ("generate", "chat"):
        done = run([command, "--help"], env={**_env(), "COLUMNS": "400"}, timeout=60)
        assert done.returncode == 0, done.stderr
        text = " ".join(done.stdout.split())
        assert "The mode: " + ", ".join(MODES) + "." in text
        for spec in MODE_REGISTRY.values():
            assert f"{spec.name}: {spec.summary}" in text
            for flag in spec.knobs:
                assert flag in text, (command, flag)


# -- every mode, with its knobs ------------------------------------------------------------

#: Each mode once, with knobs whose effect the JSON shows.
MODE_RUNS: dict[str, list[str]] = {
    "edge": [],
    "cloud": [],
    "speculative": ["--draft-length", "3"],
    "route-query": ["--cloud-fraction", "1", "--router", "draft_mean_logprob"],
    "route-token": ["--threshold", "2", "--router", "margin"],  # every top-2 margin is below 2: all routed
    "split": ["--split-layer", "2", "--compression", "fp16", "--exit-threshold", "0.99"],
}


@pytest.mark.parametrize("mode", list(MODE_RUNS))
def test_generate_runs_every_mode_with_its_knobs(tiny_pair: tuple[Path, Path], mode: str) -> None:
    assert set(MODE_RUNS) == set(MODES)
    edge_dir, cloud_dir = tiny_pair
    done = run(["generate", "--mode", mode, *MODE_RUNS[mode], "--prompt", "def f(x):", "-n", "6", "--json",
                "--edge-model", str(edge_dir), "--cloud-model", str(cloud_dir)])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mode"] == mode and len(out["token_ids"]) == 6
    assert {Origin(o) for o in out["origins"]} <= set(get_mode(mode).origins)
    assert not out["stats"]["degraded"]
    if mode == "speculative":
        assert out["stats"]["draft_lengths"] and max(out["stats"]["draft_lengths"]) <= 3
    if mode == "route-query":
        assert out["stats"]["routing"]["route"] == "cloud" and out["stats"]["routing"]["router"] == "signal"
    if mode == "route-token":
        routing = out["stats"]["routing"]
        assert routing["router"] == "margin" and routing["threshold"] == 2.0
        assert "edge-routed" not in out["origins"]
    if mode == "split":
        split = out["stats"]["split"]
        assert split["split_layer"] == 2 and split["compression"] == "fp16" and split["exit_threshold"] == 0.99


def test_chat_takes_every_knob_and_keeps_them_for_mode_switches(tiny_pair: tuple[Path, Path]) -> None:
    """`tether chat` takes the knobs of every mode; split's apply when the chat is in split mode."""
    edge_dir, cloud_dir = tiny_pair
    base = ["chat", "--edge-model", str(edge_dir), "--cloud-model", str(cloud_dir), "-n", "6", "--no-color",
            "--prompt", "hello"]
    routed = run([*base, "--mode", "route-token", "--cloud-fraction", "0", "--split-layer", "2"])
    assert routed.returncode == 0, routed.stderr
    assert "route-token · 6 tok · routed 0 tok · cloud share 0%" in routed.stdout
    split = run([*base, "--mode", "split", "--threshold", "0.99", "--compression", "int4"])
    assert split.returncode == 0, split.stderr
    assert "split · 6 tok · early exits" in split.stdout


def test_chat_session_threshold_and_mode_commands_read_the_registry(tiny_pair: tuple[Path, Path]) -> None:
    import io

    from rich.console import Console

    from tether.cli._chat import ChatSession
    from tether.edge import Client

    edge_dir, cloud_dir = tiny_pair
    out = io.StringIO()
    console = Console(file=out, width=200, no_color=True, highlight=False)
    with Client.local(str(edge_dir), str(cloud_dir)) as client:
        chat = ChatSession(client, console, mode="route-query", max_new_tokens=4)
        chat.command("/threshold")
        assert f"threshold {MODE_REGISTRY['route-query'].default_threshold} (default)" in out.getvalue()
        chat.command("/threshold 5")  # every mean log-prob is below 5: the query goes to the cloud
        assert chat.ask("x") and chat.last is not None
        assert chat.last.route == "cloud" and chat.last.threshold == 5.0  # type: ignore[attr-defined]
        chat.command("/threshold off")
        assert chat.thresholds["route-query"] is None and "(default)" in out.getvalue().splitlines()[-1]
        chat.command("/help")
        assert all(name in out.getvalue() for name in MODES)


# -- bad input: one line, exit code 2, before any model loads -----------------------------


@pytest.fixture(scope="module")
def bad_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tether.protocol import KeyPair

    root = tmp_path_factory.mktemp("bad-keys")
    good = root / "good"
    KeyPair.generate().save(good)
    insecure = root / "insecure"
    KeyPair.generate().save(insecure)
    (insecure / "private.key").chmod(0o644)
    garbled = root / "garbled"
    garbled.mkdir()
    (garbled / "private.key").write_text("not a key\n")
    (garbled / "private.key").chmod(0o600)
    return {"good": good, "insecure": insecure, "garbled": garbled, "missing": root / "missing"}


def bad_inputs(keys: dict[str, Path]) -> list[tuple[list[str], str]]:
    server_key = str(keys["good"] / "public.key")
    remote = ["--server", "ws://127.0.0.1:9", "--server-key", server_key]
    return [
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--top-p", "abc"], "Invalid value for '--top-p'"),
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "-3"], "top_k"),
        (["--mode", "nonsense"], "unknown mode 'nonsense'; choose one of " + ", ".join(MODES)),
        (["--mode", "split", "--split-layer", "many"], "--split-layer: use a number of layers >= 1 or 'auto'"),
        (["--mode", "split", "--split-layer", "0"], "--split-layer: the device runs at least one layer"),
        (["--mode", "split", "--compression", "zip"], "unknown compression 'zip'"),
        (["--mode", "split", "--exit-threshold", "1.5"], "exit_threshold must be in (0, 1]"),
        (["--mode", "route-token", "--router", "oracle"], "neither a router file (.safetensors) nor a built-in"),
        (["--mode", "route-query", "--router", "/nowhere/r.safetensors"], "no router file at /nowhere/r.safetensors"),
        (["--mode", "route-query", "--cloud-fraction", "1.5"], "--cloud-fraction must be in [0, 1]"),
        (["--mode", "route-query", "--cloud-fraction", "0.5", "--threshold", "0.1"], "not both"),
        (["--mode", "edge", "--threshold", "0.5"], "--threshold applies to"),
        (["--draft-length", "zero"], "--draft-length"),
        (["--server", "ws://127.0.0.1:9"], "--server and --server-key go together"),
        ([*remote, "--keys", str(keys["missing"])], f"no private key at {keys['missing']}"),
        ([*remote, "--keys", str(keys["insecure"])], "readable by"),
        ([*remote, "--keys", str(keys["garbled"])], str(keys["garbled"])),
        (["--server", "ws://127.0.0.1:9", "--server-key", str(keys["missing"] / "public.key")], "public key"),
        ([*remote, "--token-env", "TETHER_TEST_UNSET_TOKEN"], "TETHER_TEST_UNSET_TOKEN"),
        (["--keys", str(keys["good"])], "--keys is this device's identity towards a server"),
    ]


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model or open a client fails the test."""
    from tether.edge import Client, EdgeModel

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(EdgeModel, "load", loaded)
    for name in ("local", "connect", "edge_only"):
        monkeypatch.setattr(Client, name, loaded)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(bad_keys: dict[str, Path], command: str,
                                                                  no_model_loads: None) -> None:
    from typer.testing import CliRunner

    from tether.cli import app

    runner = CliRunner(env={"TETHER_TEST_UNSET_TOKEN": None})
    for args, message in bad_inputs(bad_keys):
        done = runner.invoke(app, [command, *args, "--prompt", "hi"])
        lines = done.stderr.strip().splitlines()
        assert done.exit_code == 2, (args, done.stderr, done.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, done.stderr)
        assert done.stdout == "", (args, done.stdout)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_input_in_a_real_process_is_fast(command: str) -> None:
    # A model path that does not exist: had anything tried to load it, the error would name it.
    t0 = time.perf_counter()
    done = run([command, "--top-p", "1.5", "--edge-model", "/no/such/model", "--prompt", "hi"], timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: top_p must be in (0, 1] (1 disables it), got 1.5 "
                                        "(--temperature, --top-p, --top-k)"]
    assert time.perf_counter() - t0 < 30  # imports only: no model was loaded


# -- keys, token and the allowlist -----------------------------------------------------------


def test_device_keys_and_token_against_an_allowlist(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A device off the allowlist gets one line with its key to add; once added (and with the
    token), it is served by the cloud."""
    from tether.protocol import KeyPair

    edge_dir, cloud_dir = tiny_pair
    device = KeyPair.generate()
    device.save(tmp_path / "device")
    allowlist = tmp_path / "allowlist"
    allowlist.write_text(KeyPair.generate().public.to_text() + "  # someone else\n")
    server_env = {**_env(), "TETHER_TOKEN": "s3cret"}
    with serve_tiny(cloud_dir, tmp_path / "server", extra=["--allow-clients", str(allowlist)],
                    env=server_env) as (url, _fingerprint, key):
        base = ["generate", "--server", url, "--server-key", key, "--edge-model", str(edge_dir), "-n", "4",
                "--json", "--prompt", "hi", "--keys", str(tmp_path / "device")]
        env = {**_env(), "DEVICE_TOKEN": "s3cret"}
        refused = run([*base, "--token-env", "DEVICE_TOKEN"], env=env)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert "not on the server's allowlist" in lines[0]
        allow_line = lines[0].split(": ", 2)[-1]
        assert allow_line == f"tether keys allow {device.public.to_text()} --allowlist ALLOWLIST_FILE"
        added = run(["keys", "allow", device.public.to_text(), "--allowlist", str(allowlist)])
        assert added.returncode == 0, added.stderr
        served = run([*base, "--token-env", "DEVICE_TOKEN"], env=env)
        assert served.returncode == 0, served.stderr
        result = json.loads(served.stdout)
        assert len(result["token_ids"]) == 4 and result["stats"]["degraded"] is False
        no_token = run(base, env={k: v for k, v in _env().items() if k != "TETHER_TOKEN"})
        assert no_token.returncode == 1 and len(no_token.stderr.strip().splitlines()) == 1, no_token.stderr
        assert "token" in no_token.stderr

"""Static keys: files, permissions, fingerprints, the allowlist and `tether keys`."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tether.protocol import Allowlist, InsecureKeyFile, KeyFileError, KeyPair, PublicKey, load_public_key
from tether.cli._keys import register


def test_save_writes_0600_and_load_round_trips(tmp_path: Path) -> None:
    keys = KeyPair.generate()
    private, public = keys.save(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert KeyPair.load(tmp_path / "k").public == keys.public
    assert KeyPair.load(private).private_bytes() == keys.private_bytes()
    assert load_public_key(public) == keys.public == load_public_key(tmp_path / "k")
    assert load_public_key(keys.public.to_text()) == keys.public
    assert keys.private_bytes().hex() not in repr(keys) and "SHA256:" in repr(keys)


def test_refuses_group_or_world_readable_private_keys(tmp_path: Path) -> None:
    private, _ = KeyPair.generate().save(tmp_path)
    for mode in (0o640, 0o604, 0o644):
        os.chmod(private, mode)
        with pytest.raises(InsecureKeyFile) as info:
            KeyPair.load(tmp_path)
        assert str(info.value) == (
            f"private key file {private} is readable by group or others (mode {mode:04o}); run: chmod 600 {private}"
        )


def test_save_refuses_to_overwrite_and_fixes_mode_when_forced(tmp_path: Path) -> None:
    private, _ = KeyPair.generate().save(tmp_path)
    with pytest.raises(KeyFileError, match="exists; pass --force"):
        KeyPair.generate().save(tmp_path)
    os.chmod(private, 0o644)
    replacement = KeyPair.generate()
    replacement.save(tmp_path, overwrite=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert KeyPair.load(tmp_path).public == replacement.public


def test_malformed_key_files(tmp_path: Path) -> None:
    bad = tmp_path / "private.key"
    bad.write_text("not base64!\n")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match=r"private.key:1: not a base64 key"):
        KeyPair.load(bad)
    bad.write_text("AAAA\n")
    with pytest.raises(KeyFileError, match="a key is 32 bytes, this one decodes to 3"):
        KeyPair.load(bad)
    with pytest.raises(KeyFileError, match="no private key at"):
        KeyPair.load(tmp_path / "missing")


def test_fingerprint_format() -> None:
    key = PublicKey(bytes(32))
    assert key.fingerprint == "SHA256:Zmh6rfhivXdsj8GLjp+OIAiXFIVu4jOzkCpZHQ1fKSU"
    assert str(key) == "A" * 43 + "="


def test_allowlist_reloads_on_change_and_fails_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = KeyPair.generate().public, KeyPair.generate().public
    path = tmp_path / "clients.txt"
    path.write_text(f"# edge devices\n{a}  # phone\n\n")
    allowlist = Allowlist.from_file(path)
    assert a in allowlist and b not in allowlist and len(allowlist) == 1
    time.sleep(0.01)
    path.write_text(f"{a}\n{b} laptop\n")
    assert b in allowlist and allowlist.reload_count == 1
    path.write_text("garbage line\n")
    assert a not in allowlist  # fail closed
    assert "allowlist reload failed" in caplog.text
    path.write_text(f"{b}\n")
    assert b in allowlist and a not in allowlist
    path.unlink()
    assert b not in allowlist


def test_allowlist_from_keys() -> None:
    a = KeyPair.generate().public
    allowlist = Allowlist([a])
    assert a in allowlist and "not a key" not in allowlist and len(allowlist) == 1


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def test_cli_generate_show_allow(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "srv")])
    assert result.exit_code == 0, result.output
    keys = KeyPair.load(tmp_path / "srv")
    assert keys.public.fingerprint in result.output
    assert stat.S_IMODE((tmp_path / "srv" / "private.key").stat().st_mode) == 0o600

    again = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "srv")])
    assert again.exit_code == 1 and "exists; pass --force" in again.output

    shown = runner.invoke(cli, ["keys", "show", str(tmp_path / "srv")])
    assert shown.exit_code == 0 and shown.output.strip() == f"{keys.public}  {keys.public.fingerprint}"
    shown_json = runner.invoke(cli, ["keys", "show", str(tmp_path / "srv" / "public.key"), "--json"])
    assert keys.public.fingerprint in shown_json.output

    os.chmod(tmp_path / "srv" / "private.key", 0o644)
    insecure = runner.invoke(cli, ["keys", "show", str(tmp_path / "srv")])
    assert insecure.exit_code == 1 and "readable by group or others" in insecure.output

    allowlist = tmp_path / "clients.txt"
    allowed = runner.invoke(cli, ["keys", "allow", str(keys.public), "--allowlist", str(allowlist), "-c", "edge-1"])
    assert allowed.exit_code == 0 and keys.public in Allowlist.from_file(allowlist)
    twice = runner.invoke(cli, ["keys", "allow", str(keys.public), "--allowlist", str(allowlist)])
    assert "already allowed" in twice.output



def test_cli_generate_takes_the_directory_as_an_argument(cli: typer.Typer, tmp_path: Path) -> None:
    """`tether keys generate DIR` as the docs write it; `--out DIR` stays as an alias; both at once must agree."""
    runner = CliRunner()
    result = runner.invoke(cli, ["keys", "generate", str(tmp_path / "a" / "server")])
    assert result.exit_code == 0, result.output
    assert KeyPair.load(tmp_path / "a" / "server").public.fingerprint in result.output
    same = runner.invoke(cli, ["keys", "generate", str(tmp_path / "b"), "--out", str(tmp_path / "b")])
    assert same.exit_code == 0 and (tmp_path / "b" / "public.key").is_file()
    both = runner.invoke(cli, ["keys", "generate", str(tmp_path / "c"), "--out", str(tmp_path / "d")])
    assert both.exit_code == 2 and "give the directory once" in both.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_missing_private_key_names_the_command_that_creates_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"create one: tether keys generate '.*/my keys'\)$"):
        KeyPair.load(tmp_path / "my keys")
    with pytest.raises(KeyFileError, match=rf"create one: tether keys generate {tmp_path}/srv\)$"):
        KeyPair.load(tmp_path / "srv" / "private.key")

"""`tether keys`: make and inspect the static X25519 identities of servers and clients.

What belongs here: the command-line face of `_keys.py`, nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["register"]

keys_app = typer.Typer(
    name="keys",
    help="Static X25519 identity keys: generate, show fingerprints, allow clients.",
    no_args_is_help=True,
)


def _default_dir() -> Path:
    from tether.paths import cache_dir

    return cache_dir() / "keys"


@keys_app.command("generate")
def generate(
    directory_arg: Annotated[
        Optional[Path],
        typer.Argument(metavar="DIR", help="Directory for private.key (0600) and public.key "
                                           "(default: the cache's keys).", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="The same as DIR (kept for older scripts).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Generate a key pair in DIR; prints the public key and its fingerprint."""
    from tether.protocol import KeyFileError, KeyPair

    if directory_arg is not None and out is not None and directory_arg != out:
        raise typer.BadParameter(f"give the directory once: DIR {directory_arg} or --out {out}, not both")
    directory = directory_arg or out or _default_dir()
    keys = KeyPair.generate()
    try:
        private_path, public_path = keys.save(directory, overwrite=force)
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"private key: {private_path} (mode 0600, keep secret)")
    typer.echo(f"public key:  {public_path}")
    typer.echo(f"{keys.public.to_text()}  {keys.public.fingerprint}")


@keys_app.command("show")
def show(
    path: Annotated[
        Optional[Path], typer.Argument(help="Keys directory, private.key or public.key (default: the cache's keys).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a public key and its fingerprint (reading a private key checks its permissions)."""
    from tether.protocol import PRIVATE_KEY_FILE, KeyFileError, KeyPair, PublicKey, load_public_key

    target = path or _default_dir()
    try:
        public: PublicKey
        if (target.is_dir() and (target / PRIVATE_KEY_FILE).exists()) or target.name == PRIVATE_KEY_FILE:
            public = KeyPair.load(target).public
        else:
            public = load_public_key(target)
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"public_key": public.to_text(), "fingerprint": public.fingerprint}))
    else:
        typer.echo(f"{public.to_text()}  {public.fingerprint}")


@keys_app.command("allow")
def allow(
    public_key: Annotated[str, typer.Argument(help="A client's public key (base64) or its public.key file.")],
    allowlist: Annotated[Path, typer.Option("--allowlist", "-a", help="Allowlist file to append to.")],
    comment: Annotated[str, typer.Option("--comment", "-c", help="Comment stored after the key.")] = "",
) -> None:
    """Add a client key to an allowlist file (a running server picks it up without restart)."""
    from tether.protocol import Allowlist, KeyFileError, load_public_key

    try:
        key = load_public_key(public_key)
        if allowlist.exists() and key in Allowlist.from_file(allowlist):
            typer.echo(f"{key.fingerprint} is already allowed")
            return
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    line = key.to_text() + (f"  # {comment}" if comment else "") + "\n"
    with allowlist.open("a", encoding="utf-8") as handle:
        handle.write(line)
    typer.echo(f"allowed {key.fingerprint}")


def register(app: typer.Typer) -> None:
    """Add `tether keys` to the root command."""
    app.add_typer(keys_app, name="keys")

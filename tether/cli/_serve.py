"""`tether serve`: run the cloud service on the encrypted protocol, with an HTTP port for operators.

What belongs here: command-line parsing, logging setup, loading the model, signal handling.
What does not: the server itself (`_server.py`). Heavy imports happen inside the command.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

_LOG_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields.

    Tether never passes prompt text or key material to its loggers; this formatter adds
    nothing but what the call site put there.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _LOG_RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve_command(
    model: Annotated[str, typer.Option("--model", envvar="TETHER_CLOUD_MODEL",
                                       help="Registry name or path of the cloud model "
                                            "(default: the registry's cloud model).")] = "",
    keys: Annotated[Optional[Path], typer.Option("--keys", help="Directory (or file) holding the server's "
                                                                "private.key (tether keys generate).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address of the encrypted protocol.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port of the encrypted protocol (0: any free port).")] = 8765,
    allow_clients: Annotated[Optional[Path], typer.Option(
        "--allow-clients", help="Allowlist file of client public keys (reloaded on change). "
                                "Without it any client key is admitted.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML/JSON file of CloudConfig limits.")] = None,
    http_host: Annotated[str, typer.Option("--http-host", help="Address of the HTTP port "
                                                               "(health, metrics, OpenAI API).")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP port; -1 disables it.")] = 8766,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the bearer key "
                                                                   "of the OpenAI-compatible API.")] = "TETHER_API_KEY",
    token_env: Annotated[str, typer.Option("--token-env", help="Environment variable holding a token clients "
                                                               "must present.")] = "TETHER_TOKEN",
    insecure_http: Annotated[bool, typer.Option(
        "--insecure-http", help="Allow the OpenAI-compatible API on a non-loopback --http-host with no API key "
                                "(anyone who reaches the port can use the model).")] = False,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads for the model (0: torch default).")] = 0,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="Run every forward alone.")] = False,
    kv_budget_per_client_mb: Annotated[Optional[int], typer.Option(
        "--kv-budget-per-client-mb", help="KV cache one client key's sessions may hold together, in MiB "
                                          "(overrides the config file; default: a quarter of kv_budget_bytes).")] = None,
    log_format: Annotated[str, typer.Option("--log-format", help="json or text.")] = "json",
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the cloud model to edge clients over the encrypted protocol."""
    import asyncio

    from tether.cloud import CloudConfig
    from tether.errors import ConfigurationError, TetherError

    setup_logging(log_level, log_format)
    log = logging.getLogger("tether.cloud.cli")
    try:
        cfg = CloudConfig.from_file(config) if config is not None else CloudConfig()
        if no_batching:
            cfg = cfg.replace(batching=False)
        if kv_budget_per_client_mb is not None:
            cfg = cfg.replace(kv_budget_per_client_bytes=kv_budget_per_client_mb * 1024 * 1024)
        if keys is None:
            raise typer.BadParameter("--keys DIR is required (create one with: tether keys generate DIR)")
        from tether.protocol import KeyPair

        server_keys = KeyPair.load(keys)
        api_key = os.environ.get(api_key_env) or None
        if http_port >= 0:
            _check_http_exposure(http_host, api_key, api_key_env, insecure_http)
        # Before the model loads (minutes for a real one), so a busy port fails at once.
        _check_port_free(host, port, "--port")
        if http_port >= 0:
            if http_port == port and port != 0:
                raise ConfigurationError(f"--port and --http-port are both {port}; give them different ports")
            _check_port_free(http_host, http_port, "--http-port")
        asyncio.run(_serve(model=model, server_keys=server_keys, host=host, port=port, allow=allow_clients,
                           cfg=cfg, http_host=http_host, http_port=None if http_port < 0 else http_port,
                           api_key=api_key, token=os.environ.get(token_env) or None,
                           threads=threads, log=log))
    except TetherError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_http_exposure(http_host: str, api_key: str | None, api_key_env: str, insecure: bool) -> None:
    """Refuse an open OpenAI-compatible API on a reachable address unless asked for."""
    from tether.errors import ConfigurationError

    if api_key is None and not insecure and not _is_loopback(http_host):
        raise ConfigurationError(
            f"--http-host {http_host} is not a loopback address and ${api_key_env} is not set, so anyone who "
            f"reaches the port could use the model: set {api_key_env} (the API's bearer key), or pass "
            "--insecure-http to serve it without one")


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Raise `ConfigurationError` if `host:port` cannot be bound (port 0 is always free)."""
    from tether.errors import ConfigurationError

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"{flag}: cannot resolve host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # The servers set SO_REUSEADDR too: a port in TIME_WAIT is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigurationError(f"{flag} {port}: {host}:{port} is already in use (another tether serve?); "
                                         f"choose another port with {flag}, or 0 for any free port") from exc
            raise ConfigurationError(f"{flag} {port}: cannot listen on {host}:{port}: {exc.strerror}") from exc


async def _serve(*, model: str, server_keys: Any, host: str, port: int, allow: Path | None, cfg: Any,
                 http_host: str, http_port: int | None, api_key: str | None, token: str | None, threads: int,
                 log: logging.Logger) -> None:
    import asyncio
    import signal

    import torch

    from tether.cloud import CloudServer, SessionManager
    from tether.errors import ConfigurationError
    from tether.runtime import load_runtime

    if not model:
        from tether.models import DEFAULT_CLOUD_MODEL

        model = DEFAULT_CLOUD_MODEL
    if threads > 0:
        torch.set_num_threads(threads)
    log.info("loading model", extra={"model": model})
    started = time.perf_counter()
    runtime, tokenizer = await asyncio.to_thread(load_runtime, model, "torch")
    log.info("model loaded", extra={"model": model, "seconds": round(time.perf_counter() - started, 1)})
    name = Path(model).name if os.path.sep in model else model
    manager = SessionManager(runtime, tokenizer=tokenizer, config=cfg, model_name=name,
                             aliases=(model, runtime.info.name))
    server = CloudServer(manager, keys=server_keys, host=host, port=port,
                         allowlist=str(allow) if allow is not None else None, token=token,
                         http_host=http_host, http_port=http_port, api_key=api_key)
    try:
        await server.start()
    except OSError as exc:  # a port taken between the check and now
        with contextlib.suppress(Exception):
            await server.close(grace=0)
        raise ConfigurationError(f"cannot listen on {host}:{port} / {http_host}:{http_port}: {exc.strerror}; "
                                 "choose other ports with --port / --http-port") from exc
    typer.echo(f"tether serve: model {name}")
    typer.echo(f"  listening  {server.url}")
    typer.echo(f"  server key {server.fingerprint}  (clients pin this key: {server.keys.public.to_text()})")
    if server.http_url:
        typer.echo(f"  http       {server.http_url}  (/healthz /readyz /metrics /v1/...)")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    typer.echo("tether serve: draining (in-flight requests finish) ...")
    await server.close()
    typer.echo("tether serve: stopped")


def register(app: typer.Typer) -> None:
    """Add `tether serve` to the root command line."""
    app.command("serve")(serve_command)

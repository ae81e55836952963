"""`tether serve`: run the cloud service on the encrypted protocol, with an HTTP port for operators.

What belongs here: command-line parsing, logging setup, loading the model, signal handling.
What does not: the server itself (`_server.py`). Heavy imports happen inside the command.
"""

from __future__ import annotations

import json
import logging
import os
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
    model: Annotated[str, typer.Option("--model", help="Registry name or path of the cloud model "
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
    threads: Annotated[int, typer.Option("--threads", help="Torch threads for the model (0: torch default).")] = 0,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="Run every forward alone.")] = False,
    log_format: Annotated[str, typer.Option("--log-format", help="json or text.")] = "json",
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the cloud model to edge clients over the encrypted protocol."""
    import asyncio

    from tether.cloud._config import CloudConfig
    from tether.errors import TetherError

    setup_logging(log_level, log_format)
    log = logging.getLogger("tether.cloud.cli")
    try:
        cfg = CloudConfig.from_file(config) if config is not None else CloudConfig()
        if no_batching:
            cfg = cfg.replace(batching=False)
        if keys is None:
            raise typer.BadParameter("--keys DIR is required (create one with: tether keys generate DIR)")
        from tether.protocol import KeyPair

        server_keys = KeyPair.load(keys)
        asyncio.run(_serve(model=model, server_keys=server_keys, host=host, port=port, allow=allow_clients,
                           cfg=cfg, http_host=http_host, http_port=None if http_port < 0 else http_port,
                           api_key=os.environ.get(api_key_env) or None, token=os.environ.get(token_env) or None,
                           threads=threads, log=log))
    except TetherError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _serve(*, model: str, server_keys: Any, host: str, port: int, allow: Path | None, cfg: Any,
                 http_host: str, http_port: int | None, api_key: str | None, token: str | None, threads: int,
                 log: logging.Logger) -> None:
    import asyncio
    import signal

    import torch

    from tether.cloud._manager import SessionManager
    from tether.cloud._server import CloudServer
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
    await server.start()
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

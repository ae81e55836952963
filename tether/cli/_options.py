"""Options shared by `tether generate` and `tether chat`: flags, their validation, the client.

What belongs here: the flags both commands take (model, sampling, connection with keys and
token, every mode's knobs), turning them into validated SDK values *before any model
loads*, the one-line error with exit code 2 for bad input, and opening the client. Which
modes exist, their knobs, colours and thresholds come from `tether.edge.MODE_REGISTRY`;
nothing here lists a mode by hand. What does not: the commands' own output.

Importing `tether.edge` costs seconds (torch), so this module does it only inside functions:
`tether --help` stays fast, and a command's ``--help`` fills in the modes when it is shown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, Optional

import typer
from typer.core import TyperCommand

if TYPE_CHECKING:
    from tether.edge import Client, ModeSpec, SpeculativeOptions, SplitOptions
    from tether.protocol import KeyPair
    from tether.routing import RoutingOptions

#: The placeholder a help text uses for the list of modes (filled from the registry when shown).
MODES_HELP = "{modes}"
#: The placeholder for what each mode's threshold means and its default.
THRESHOLDS_HELP = "{thresholds}"
#: The environment variable holding the bearer token, unless ``--token-env`` names another.
DEFAULT_TOKEN_ENV = "TETHER_TOKEN"
#: Exit code of bad command-line input (click's own usage errors use it too).
USAGE_EXIT = 2


def fail(message: str, code: int = USAGE_EXIT) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit (2: bad input)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


class ModeCommand(TyperCommand):
    """A command whose bad input is one ``error:`` line (exit 2) and whose help lists the modes.

    Click reports a usage error as a usage block plus a framed message; a script (and a
    person) reads one line better. The modes in the help come from the registry when the
    help is shown, so listing the commands stays fast.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as exc:  # typer's (vendored) click usage errors
            format_message = getattr(exc, "format_message", None)
            if format_message is None:
                raise
            fail(format_message())

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from tether.edge import MODE_REGISTRY, MODES

        thresholds = "; ".join(
            f"{s.name}: {s.threshold_help}" + ("" if s.default_threshold is None else f" (default {s.default_threshold})")
            for s in MODE_REGISTRY.values() if s.threshold_field is not None
        )
        for param in self.params:
            text = getattr(param, "help", None)
            if isinstance(text, str):
                text = text.replace(MODES_HELP, ", ".join(MODES)).replace(THRESHOLDS_HELP, thresholds)
                param.help = text  # type: ignore[attr-defined]
        if not self.epilog:
            lines = [f"{spec.name}: {spec.summary}" + (f" ({', '.join(spec.knobs)})" if spec.knobs else "")
                     for spec in MODE_REGISTRY.values()]
            self.epilog = "Modes: " + "; ".join(lines) + "."
        super().format_help(ctx, formatter)


# -- the shared flags ----------------------------------------------------------------------

ModeOpt = Annotated[str, typer.Option("--mode", "-m", help=f"The mode: {MODES_HELP}.")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy; > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus mass in (0, 1] (1 disables).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Top-k (0 disables).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (sampling).")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="A system message.")]
ServerOpt = Annotated[Optional[str], typer.Option(
    "--server", help="A `tether serve` URL (ws://host:port); default: the cloud runs in this process.")]
ServerKeyOpt = Annotated[Optional[str], typer.Option(
    "--server-key", help="The server's public key to pin (base64, or its public.key file) or its SHA256: "
    "fingerprint, as `tether serve` prints it after 'clients pin this key:'.")]
KeysOpt = Annotated[Optional[Path], typer.Option(
    "--keys", help="This device's key pair (a directory from `tether keys generate DIR`, or its private.key); "
    "with --server. Default: a new key per run (accepted only by servers without an allowlist).")]
TokenEnvOpt = Annotated[Optional[str], typer.Option(
    "--token-env", help=f"Environment variable holding the bearer token sent to --server (default "
    f"{DEFAULT_TOKEN_ENV}; sent when set).")]
EdgeModelOpt = Annotated[Optional[str], typer.Option(
    "--edge-model", envvar="TETHER_EDGE_MODEL",
    help="Edge model: registry name or Hugging Face model directory (default: the registry's edge model).")]
CloudModelOpt = Annotated[Optional[str], typer.Option(
    "--cloud-model", envvar="TETHER_CLOUD_MODEL",
    help="Cloud model of the in-process cloud: registry name or model directory (default: the registry's).")]
EdgeBackendOpt = Annotated[str, typer.Option("--edge-backend", help="torch, onnx-int4, onnx-int8, onnx-fp32.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="Edge compute threads.")]
ColorOpt = Annotated[bool, typer.Option("--color/--no-color", help="Colour tokens by origin.")]
DraftLengthOpt = Annotated[str, typer.Option(
    "--draft-length", help="speculative: adaptive, heuristic or a fixed number of tokens.")]
ThresholdOpt = Annotated[Optional[float], typer.Option(
    "--threshold", help=f"The threshold of the mode: {THRESHOLDS_HELP}.")]
CloudFractionOpt = Annotated[Optional[float], typer.Option(
    "--cloud-fraction", help="route-query / route-token: the share of queries / tokens to send to the cloud, "
    "in [0, 1] (instead of --threshold; calibrated scores ship with the built-in routers).")]
RouterOpt = Annotated[Optional[str], typer.Option(
    "--router", help="route-query / route-token: a router file (.safetensors, from `tether router`) or a "
    "built-in name (query: draft_mean_logprob, prompt_logprob, ..., random; token: confidence, margin, random).")]
SplitLayerOpt = Annotated[Optional[str], typer.Option(
    "--split-layer", help="split: layers run on the device, a number >= 1 or 'auto' (default).")]
CompressionOpt = Annotated[Optional[str], typer.Option(
    "--compression", help="split: how hidden states travel: fp32, fp16, bf16, int8 (default), int8-deflate, int4.")]
ExitThresholdOpt = Annotated[Optional[float], typer.Option(
    "--exit-threshold", help="split: early exit when the device's top probability is at least this, in (0, 1].")]


# -- validation ------------------------------------------------------------------------------


@dataclass
class ModeKnobs:
    """Every mode's knobs as given on the command line (None: not given)."""

    draft_length: str = "adaptive"
    threshold: float | None = None
    cloud_fraction: float | None = None
    router: str | None = None
    split_layer: str | None = None
    compression: str | None = None
    exit_threshold: float | None = None

    def given(self) -> set[str]:
        """The flags given (``draft_length`` counts when it is not the default)."""
        flags = {"--threshold": self.threshold, "--cloud-fraction": self.cloud_fraction, "--router": self.router,
                 "--split-layer": self.split_layer, "--compression": self.compression,
                 "--exit-threshold": self.exit_threshold}
        out = {flag for flag, value in flags.items() if value is not None}
        if self.draft_length != "adaptive":
            out.add("--draft-length")
        return out


@dataclass
class Settings:
    """Validated settings of one command: the mode, its options, the sampling, the connection.

    Attributes:
        mode: the starting mode's registry entry.
        speculative, routing, split: the options of those modes (every mode's, so the chat
            can switch modes).
        thresholds: the threshold of each mode that has one (None: as the SDK resolves it:
            the cloud fraction, the router's own threshold or the mode's default; split's
            early exit is off).
        keys: this device's key pair (``--keys``), None for an ephemeral one.
        token: the bearer token from the environment (``--token-env``), None if unset.
    """

    mode: ModeSpec
    speculative: SpeculativeOptions
    routing: RoutingOptions
    split: SplitOptions
    thresholds: dict[str, float | None] = field(default_factory=dict)
    server: str | None = None
    server_key: str | None = None
    keys: KeyPair | None = None
    token: str | None = None

    @classmethod
    def defaults(cls, mode: str) -> Settings:
        """Every mode's default options, starting in `mode` (no connection).

        Raises:
            ConfigurationError: unknown mode.
        """
        from tether.edge import SpeculativeOptions, SplitOptions, get_mode
        from tether.routing import RoutingOptions

        settings = cls(mode=get_mode(mode), speculative=SpeculativeOptions(), routing=RoutingOptions(),
                       split=SplitOptions())
        settings.read_thresholds()
        return settings

    def read_thresholds(self) -> None:
        """Take each mode's threshold from its options (None: the SDK resolves it)."""
        from tether.edge import MODE_REGISTRY

        for s in MODE_REGISTRY.values():
            if s.threshold_field is not None:
                self.thresholds[s.name] = getattr(getattr(self, str(s.options_field)), s.threshold_field)

    def options_for(self, name: str) -> Any:
        """The options object of mode `name`, with its current threshold (None: no options)."""
        from tether.edge import get_mode

        spec = get_mode(name)
        if spec.options_field is None:
            return None
        options = getattr(self, spec.options_field)
        if spec.threshold_field is not None:
            options = spec.options_with_threshold(options, self.thresholds.get(name))
        return options


def validate(
    *, mode: str, knobs: ModeKnobs, temperature: float, top_p: float, top_k: int, server: str | None,
    server_key: str | None, keys: Path | None, token_env: str | None, strict_knobs: bool,
) -> Settings:
    """Check every flag and build the SDK values; any problem ends the command (exit 2) here,
    before a model loads.

    Args:
        strict_knobs: a knob of another mode than `mode` is an error (`tether generate`);
            the chat keeps it for when that mode is switched to.
    """
    from tether.edge import MODE_REGISTRY, MODES, SpeculativeOptions, SplitOptions
    from tether.errors import ConfigurationError
    from tether.routing import RoutingOptions
    from tether.sampling import validate_warp

    spec = MODE_REGISTRY.get(mode)
    if spec is None:
        fail(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    try:
        validate_warp(temperature=temperature, top_k=top_k, top_p=top_p)
    except (ValueError, ConfigurationError) as exc:
        fail(f"{exc} (--temperature, --top-p, --top-k)")
    given = knobs.given()
    allowed = set(spec.knobs) if strict_knobs else {flag for s in MODE_REGISTRY.values() for flag in s.knobs}
    for flag in sorted(given - allowed):
        owners = [s.name for s in MODE_REGISTRY.values() if flag in s.knobs]
        fail(f"{flag} applies to {' and '.join(owners)} (--mode {owners[0]}), not to mode {mode}")
    if knobs.threshold is not None and spec.threshold_field is None:
        fail(f"--threshold applies to {', '.join(s.name for s in MODE_REGISTRY.values() if s.threshold_field)}; "
             f"mode {mode} has none")
    if knobs.threshold is not None and knobs.cloud_fraction is not None:
        fail("give --threshold or --cloud-fraction, not both")
    if knobs.threshold is not None and knobs.exit_threshold is not None and mode == "split":
        fail("give --threshold or --exit-threshold, not both (in split mode they are the same)")
    try:
        speculative = SpeculativeOptions(draft_length=_draft_length(knobs.draft_length))
        routing = _routing(spec, knobs)
        split_threshold = knobs.exit_threshold if knobs.exit_threshold is not None else (
            knobs.threshold if mode == "split" else None)
        split = SplitOptions(split_layer=_split_layer(knobs.split_layer), compression=knobs.compression or "int8",
                             exit_threshold=split_threshold)
    except (ValueError, ConfigurationError) as exc:
        fail(str(exc))
    settings = Settings.defaults(mode)
    settings.speculative, settings.routing, settings.split = speculative, routing, split
    settings.read_thresholds()
    if knobs.threshold is not None and spec.threshold_field is not None:
        if not math.isfinite(knobs.threshold):
            fail(f"--threshold must be a finite number, got {knobs.threshold}")
        settings.thresholds[spec.name] = knobs.threshold
    for name, value in _connection(server, server_key, keys, token_env).items():
        setattr(settings, name, value)
    return settings


def _draft_length(value: str) -> str | int:
    if value in ("adaptive", "heuristic"):
        return value
    try:
        k = int(value)
    except ValueError:
        fail(f"--draft-length: use 'adaptive', 'heuristic' or a number of tokens, not {value!r}")
    if k < 1:
        fail("--draft-length: a fixed draft length must be >= 1")
    return k


def _split_layer(value: str | None) -> int | Literal["auto"]:
    if value is None or value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        fail(f"--split-layer: use a number of layers >= 1 or 'auto', not {value!r}")
    if k < 1:
        fail(f"--split-layer: the device runs at least one layer, got {k}")
    return k


def _routing(spec: ModeSpec, knobs: ModeKnobs) -> RoutingOptions:
    """The routing options: the router of the starting routing mode, and the cloud fraction."""
    from tether.routing import RoutingOptions
    from tether.routing import BUILTIN_QUERY_ROUTERS, BUILTIN_TOKEN_ROUTERS

    if knobs.cloud_fraction is not None and not 0.0 <= knobs.cloud_fraction <= 1.0:
        fail(f"--cloud-fraction must be in [0, 1], got {knobs.cloud_fraction}")
    routers: dict[str, Any] = {}
    if knobs.router is not None:
        if spec.name not in ("route-query", "route-token"):
            fail(f"--router applies to route-query and route-token; start the chat in one (--mode), not {spec.name}")
        level = "query" if spec.name == "route-query" else "token"
        routers[f"{level}_router"] = _router(knobs.router, level,
                                             BUILTIN_QUERY_ROUTERS if level == "query" else BUILTIN_TOKEN_ROUTERS)
    return RoutingOptions(cloud_fraction=knobs.cloud_fraction, **routers)


def _router(value: str, level: str, names: tuple[str, ...]) -> Any:
    """A built-in router name as is, or the router loaded from a file now (a bad file fails here)."""
    from tether.routing import load_router

    if value in names:
        return value
    path = Path(value)
    if path.suffix != ".safetensors" and not path.exists():
        fail(f"--router: {value!r} is neither a router file (.safetensors) nor a built-in {level} router "
             f"({', '.join(names)})")
    if not path.is_file():
        fail(f"--router: no router file at {value}")
    router = load_router(path)  # ConfigurationError: reported by the caller as one line
    if router.level != level:
        fail(f"--router: {value} is a {router.level} router; route-{level} needs a {level} router")
    return router


def _connection(server: str | None, server_key: str | None, keys: Path | None,
                token_env: str | None) -> dict[str, Any]:
    """The connection settings: pinned server key, this device's key pair and the token, read now."""
    from tether.errors import ConfigurationError
    from tether.protocol import KeyPair, load_public_key

    if (server is None) != (server_key is None):
        fail("--server and --server-key go together")
    if server is None:
        if keys is not None:
            fail("--keys is this device's identity towards a server: use it with --server")
        if token_env is not None:
            fail("--token-env names the token sent to a server: use it with --server")
        return {}
    assert server_key is not None
    try:
        if not server_key.startswith("SHA256:"):
            load_public_key(server_key)
        pair = None if keys is None else KeyPair.load(keys)
    except ConfigurationError as exc:
        fail(str(exc))
    name = token_env or DEFAULT_TOKEN_ENV
    token = os.environ.get(name) or None
    if token_env is not None and token is None:
        fail(f"--token-env {token_env}: that environment variable is not set")
    return {"server": server, "server_key": server_key, "keys": pair, "token": token}


# -- opening the client ----------------------------------------------------------------------


def open_client(settings: Settings, *, edge_model: str | None, cloud_model: str | None, edge_backend: str,
                threads: int | None, edge_only: bool) -> Client:
    """The SDK client the settings describe (loads the models); errors end the command (exit 1).

    A server that refuses this device's key prints one line: that the device is not on its
    allowlist, and the command that adds it.
    """
    from tether.edge import Client
    from tether.errors import TetherError

    try:
        if settings.server is not None:
            assert settings.server_key is not None
            return Client.connect(settings.server, server_key=settings.server_key, edge_model=edge_model,
                                  edge_backend=edge_backend, edge_threads=threads, client_keys=settings.keys,
                                  token=settings.token, speculative=settings.speculative, split=settings.split)
        if edge_only:
            return Client.edge_only(edge_model, backend=edge_backend, threads=threads)
        return Client.local(edge_model, cloud_model, edge_backend=edge_backend, edge_threads=threads,
                            speculative=settings.speculative, split=settings.split)
    except TetherError as exc:
        fail(str(exc), code=1)

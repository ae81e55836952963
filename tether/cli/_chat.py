"""`tether chat`: the demo chat in a terminal, coloured by where each token came from.

What belongs here: the REPL (history, slash commands, Ctrl-C handling, live status line)
over the public SDK (`tether.edge.Client`). What does not: any decoding logic.

Registered by `tether.cli`; torch and the models are imported inside the command, so
`tether --help` stays fast.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from tether.cli import _options as opt
from tether.cli._options import ModeCommand, ModeKnobs, Settings, fail, open_client, validate

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from tether.edge import Client, GenerateOptions, GenerationStats, ModeSpec

#: What `tether chat` answers when stdin is not a terminal and no --prompt is given.
DEMO_PROMPT = "Write a Python function that checks whether a number is prime."

#: The conversation keeps at most this many messages (older turns are dropped first).
MAX_HISTORY_MESSAGES = 20


def help_text() -> str:
    """The slash commands, with the modes and their thresholds from the mode registry."""
    from tether.edge import MODE_REGISTRY, MODES

    thresholds = "; ".join(
        f"{s.name}: {s.threshold_help}" + (f", default {s.default_threshold}" if s.default_threshold is not None else "")
        for s in MODE_REGISTRY.values() if s.threshold_field is not None
    )
    return (
        "[bold]Commands[/bold]\n"
        f"  /mode [MODE]        show or switch the mode: {', '.join(MODES)}\n"
        "  /threshold [VALUE]  show or set the threshold of the current mode ('off': the default / none)\n"
        f"                      ({_escape(thresholds)})\n"
        "  /stats              the last answer's statistics and the session's totals\n"
        "  /reset              forget the conversation (and the session's totals)\n"
        "  /help               this help\n"
        "  /quit               leave (or Ctrl-D)\n"
        "Ctrl-C stops an answer in progress; the conversation goes on without it."
    )


def origin_style(origin: str) -> str:
    """The colour of an origin's value (from the mode registry), "" for an unknown one."""
    from tether.edge import ORIGIN_STYLES, Origin

    try:
        return ORIGIN_STYLES[Origin(origin)]
    except ValueError:
        return ""

_CONTROL = {c: "\ufffd" for c in (*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0))}
_CONTROL[13] = ""


def printable(text: str) -> str:
    """Model text made safe for a terminal: control characters (but newline and tab) replaced."""
    return text.translate(_CONTROL)


@dataclass
class Totals:
    """What the session's answers added up to."""

    answers: int = 0
    tokens_by_origin: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def add(self, stats: GenerationStats) -> None:
        self.answers += 1
        for origin, n in stats.tokens_by_origin.items():
            self.tokens_by_origin[origin] = self.tokens_by_origin.get(origin, 0) + n
        self.wall_s += stats.wall_s

    @property
    def tokens(self) -> int:
        return sum(self.tokens_by_origin.values())

    @property
    def cloud_share(self) -> float | None:
        n = self.tokens
        cloud = self.tokens_by_origin.get("cloud-corrected", 0) + self.tokens_by_origin.get("cloud-generated", 0)
        return cloud / n if n else None


class ChatSession:
    """One chat: the client, the conversation, the current mode and every mode's settings.

    Args:
        client: a blocking `Client` (local or connected).
        console: where everything is printed.
        mode: the starting mode.
        max_new_tokens, temperature, top_p, top_k, seed, system: generation settings of every answer.
        settings: every mode's options and thresholds, as `tether chat` validated them
            (None: the registry's defaults).
        threshold: the starting mode's threshold (None: as in `settings`).
        link: how the cloud is reached, for the status line (``"in-process"`` or a URL).
    """

    def __init__(self, client: Client, console: Console, *, mode: str, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 system: str | None = None, settings: Settings | None = None, threshold: float | None = None,
                 link: str = "in-process") -> None:
        self.client, self.console = client, console
        self.settings = settings or Settings.defaults(mode)
        self.mode = self.settings.mode.name
        self.max_new_tokens, self.temperature, self.seed, self.system = max_new_tokens, temperature, seed, system
        self.top_p, self.top_k = top_p, top_k
        if threshold is not None:
            self.thresholds[mode] = threshold
        self.link = link
        self.history: list[dict[str, str]] = []
        self.last: GenerationStats | None = None
        self.totals = Totals()
        tok = client.aclient.edge.tokenizer
        self.multi_turn = bool(getattr(tok, "chat_template", None))

    @property
    def thresholds(self) -> dict[str, float | None]:
        """The threshold of each mode that has one (None: the default, or off)."""
        return self.settings.thresholds

    @property
    def spec(self) -> ModeSpec:
        """The current mode's registry entry."""
        from tether.edge import get_mode

        return get_mode(self.mode)

    # -- one answer ---------------------------------------------------------------------

    def options(self) -> GenerateOptions:
        """The settings of the next answer: the current mode with its options and threshold."""
        from tether.edge import GenerateOptions

        spec = self.spec
        mode_options = {spec.options_field: self.settings.options_for(spec.name)} if spec.options_field else {}
        return GenerateOptions(mode=spec.name, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed, system=self.system,
                               **mode_options)

    def ask(self, question: str) -> bool:
        """Answer one question, streaming; returns False if it failed or was cancelled.

        The question and the answer join the history only when the answer completes.
        """
        from tether.errors import TetherError

        messages = [*self.history, {"role": "user", "content": question}]
        prompt: Any = messages if self.multi_turn else question
        answer = _new_text()
        gen = None
        try:
            gen = self.client.stream(prompt, self.options())
            with gen:
                if self.console.is_terminal:
                    self._stream_live(gen, answer)
                else:
                    for tok in gen:
                        piece = printable(tok.text)
                        answer.append(piece, style=origin_style(tok.origin.value))
                        self.console.print(_styled(piece, tok.origin.value), end="")
                    self.console.print()
            result = gen.result
        except KeyboardInterrupt:
            if self.console.is_terminal:
                self.console.print(answer)
            self.console.print("[yellow]⏹ cancelled[/yellow] [dim](not added to the conversation)[/dim]")
            return False
        except (TetherError, ValueError) as exc:
            self.console.print(f"[red]error:[/red] {_escape(str(exc))}")
            return False
        self.last = result.stats
        self.totals.add(result.stats)
        if self.multi_turn:
            self.history = [*messages, {"role": "assistant", "content": result.text}][-MAX_HISTORY_MESSAGES:]
        self.console.print(self.status_line(result.stats))
        return True

    def _stream_live(self, gen: Any, answer: Text) -> None:
        from rich.live import Live

        with Live(console=self.console, refresh_per_second=10, transient=True) as live:
            live.update(self._live_view(answer, None))
            for tok in gen:
                answer.append(printable(tok.text), style=origin_style(tok.origin.value))
                live.update(self._live_view(answer, gen.stats))
        self.console.print(answer)

    def _live_view(self, answer: Text, stats: GenerationStats | None) -> RenderableType:
        """The tail of the answer that fits the screen, and the status line under it."""
        from rich.console import Group
        from rich.text import Text

        rows = max(1, self.console.height - 3)
        lines = answer.split("\n", allow_blank=True)[-rows:]
        tail = Text("\n").join(lines)
        budget = rows * max(20, self.console.width)
        if len(tail) > budget:
            tail = tail[len(tail) - budget:]
        status = self.status_line(stats, live=True) if stats is not None else Text(f"  {self.mode} · thinking…",
                                                                                     style="dim")
        return Group(tail, status)

    # -- status --------------------------------------------------------------------------

    def link_state(self, stats: GenerationStats | None) -> str:
        """``in-process``, ``in-process (cloud idle)``, the server URL, ``degraded``..."""
        cloud = self.client.aclient.cloud
        if cloud is None:
            return "no cloud"
        inner = getattr(cloud, "inner", cloud)
        state = self.link
        if getattr(inner, "started", True) is False:
            state += " (cloud idle)"
        if stats is not None:
            if stats.degraded:
                state += " · degraded (cloud unreachable)"
            if stats.reconnects:
                state += f" · {stats.reconnects} reconnect(s)"
            if stats.rtt_s is not None and self.link != "in-process":
                state += f" · rtt {stats.rtt_s * 1000:.0f} ms"
        return state

    def status_line(self, stats: GenerationStats | None, *, live: bool = False) -> Text:
        """One dim line: mode, acceptance, cloud share, tokens/s, link."""
        from rich.text import Text

        parts = [stats.mode if stats is not None else self.mode]
        if stats is not None:
            parts.append(f"{stats.completion_tokens} tok")
            if stats.drafted_tokens or stats.mode == "speculative":
                parts.append(f"acceptance {_pct(stats.acceptance_rate)}")
            route = getattr(stats, "route", None)
            if route:
                parts.append(f"routed to {route}")
            elif stats.mode == "route-token":
                parts.append(f"routed {len(getattr(stats, 'routed_positions', ()))} tok")
            if stats.mode == "split":
                parts.append(f"early exits {getattr(stats, 'early_exits', 0)}")
            parts.append(f"cloud share {_pct(stats.cloud_share)}")
            parts.append(f"{stats.tokens_per_s or 0.0:.1f} tok/s")
        parts.append(f"link {self.link_state(stats)}")
        line = Text(no_wrap=True, overflow="ellipsis")
        if live:
            line.append("  ● Ctrl-C stops", style="yellow")
        line.append("  " + " · ".join(parts), style="dim")
        return line

    def print_stats(self) -> None:
        """The last answer's figures and the session's totals, as a table."""
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("")
        table.add_column("last answer", justify="right")
        table.add_column("session", justify="right")
        s, t = self.last, self.totals
        origins = sorted({*(s.tokens_by_origin if s else {}), *t.tokens_by_origin})
        table.add_row("answers", "1" if s else "-", str(t.answers))
        table.add_row("mode", s.mode if s else "-", self.mode + " (now)")
        for origin in origins:
            style = origin_style(origin)
            table.add_row(f"[{style}]{origin}[/]" if style else origin,
                          str(s.tokens_by_origin.get(origin, 0)) if s else "-", str(t.tokens_by_origin.get(origin, 0)))
        table.add_row("cloud share", _pct(s.cloud_share) if s else "-", _pct(t.cloud_share))
        if s is not None:
            for label, value in (
                ("rounds", str(s.rounds)), ("drafted / accepted", f"{s.drafted_tokens} / {s.accepted_tokens}"),
                ("acceptance", _pct(s.acceptance_rate)), ("cloud forward passes", str(s.cloud_forward_passes)),
                ("bytes up / down", f"{s.bytes_up} / {s.bytes_down}"), ("time to first token", _secs(s.ttft_s)),
                ("wall", _secs(s.wall_s)), ("tokens/s", f"{s.tokens_per_s or 0.0:.1f}"),
            ):
                table.add_row(label, value, "")
            routing = getattr(s, "router", "")
            if routing:
                table.add_row("router / threshold", f"{routing} / {getattr(s, 'threshold', None)}", "")
        table.add_row("link", self.link_state(s), "")
        self.console.print(table)

    # -- commands ------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; returns False when the chat should end."""
        from tether.edge import MODE_REGISTRY, MODES

        name, _, arg = line[1:].strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            self.console.print(help_text())
        elif name == "mode":
            if not arg:
                self.console.print(f"mode [bold]{self.mode}[/bold] (choose one of {', '.join(MODES)})")
            elif arg not in MODES:
                self.console.print(f"[red]unknown mode {_escape(arg)!r}[/red]; choose one of {', '.join(MODES)}")
            else:
                self.mode = MODE_REGISTRY[arg].name
                self.console.print(f"mode → [bold]{arg}[/bold]" + self._threshold_note())
        elif name == "threshold":
            self._set_threshold(arg)
        elif name == "stats":
            self.print_stats()
        elif name == "reset":
            self.history, self.last, self.totals = [], None, Totals()
            self.console.print("conversation cleared")
        else:
            self.console.print(f"[red]unknown command /{_escape(name)}[/red]; /help lists them")
        return True

    def _threshold_note(self) -> str:
        spec = self.spec
        if spec.threshold_field is None:
            return ""
        return f" (threshold {self._threshold_text(spec)}; /threshold to change)"

    def _threshold_text(self, spec: ModeSpec) -> str:
        value = self.thresholds.get(spec.name)
        if value is not None:
            return str(value)
        fraction = getattr(self.settings.options_for(spec.name), "cloud_fraction", None)
        if fraction is not None:
            return f"from cloud fraction {fraction}"
        return "off" if spec.default_threshold is None else f"{spec.default_threshold} (default)"

    def _set_threshold(self, arg: str) -> None:
        from tether.edge import MODE_REGISTRY
        from tether.errors import ConfigurationError

        spec = self.spec
        if spec.threshold_field is None:
            having = ", ".join(s.name for s in MODE_REGISTRY.values() if s.threshold_field is not None)
            self.console.print(f"mode {self.mode} has no threshold ({having} do)")
            return
        if not arg:
            self.console.print(f"{self.mode}:{self._threshold_note()}")
            return
        value: float | None
        if arg.lower() in ("off", "none", "default"):
            value = None
        else:
            try:
                value = float(arg)
            except ValueError:
                self.console.print(f"[red]not a number: {_escape(arg)!r}[/red]")
                return
            try:  # the mode's options check the value's range
                spec.options_with_threshold(self.settings.options_for(spec.name), value)
            except (ConfigurationError, ValueError) as exc:
                self.console.print(f"[red]{_escape(str(exc))}[/red]")
                return
        self.thresholds[self.mode] = value
        if value is None:
            self.console.print(f"{self.mode}: threshold {self._threshold_text(spec)}")
        else:
            self.console.print(f"{self.mode}: threshold → {value}")

    # -- the loop ------------------------------------------------------------------------

    def repl(self) -> None:
        """Read questions and commands until /quit or end of input."""
        _restore_ctrl_c()
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        prompt = "\x01\x1b[1;32m\x02you ›\x01\x1b[0m\x02 " if self.console.is_terminal else "you › "
        while True:
            try:
                line = input(prompt).strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        break
                    continue
                self.ask(line)
            except EOFError:
                self.console.print()
                break
            except KeyboardInterrupt:  # at the prompt, or between answers: the session goes on
                self.console.print("\n[dim](Ctrl-C: /quit or Ctrl-D leaves)[/dim]")
        self.console.print("[dim]bye[/dim]")


def _restore_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt again, even when the chat was started by a parent
    that ignores SIGINT (a disposition children inherit): the chat depends on it to stop an
    answer and to keep the session going."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _new_text() -> Text:
    from rich.text import Text

    return Text()


def _styled(piece: str, origin: str) -> Text:
    from rich.text import Text

    return Text(piece, style=origin_style(origin))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def legend() -> Text:
    """One line naming each colour."""
    from rich.text import Text

    from tether.edge import ORIGIN_LABELS, ORIGIN_STYLES

    line = Text("  ")
    for origin, label in ORIGIN_LABELS.items():
        line.append("■ ", style=ORIGIN_STYLES[origin])
        line.append(label + "  ", style="dim")
    return line


def chat(
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="Answer this one prompt and exit ('-' reads it from stdin).")] = None,
    mode: opt.ModeOpt = "speculative",
    max_new_tokens: opt.MaxNewTokensOpt = 256,
    temperature: opt.TemperatureOpt = 0.0,
    top_p: opt.TopPOpt = 1.0,
    top_k: opt.TopKOpt = 0,
    seed: opt.SeedOpt = None,
    system: opt.SystemOpt = None,
    server: opt.ServerOpt = None,
    server_key: opt.ServerKeyOpt = None,
    keys: opt.KeysOpt = None,
    token_env: opt.TokenEnvOpt = None,
    edge_model: opt.EdgeModelOpt = None,
    cloud_model: opt.CloudModelOpt = None,
    edge_backend: opt.EdgeBackendOpt = "torch",
    threads: opt.ThreadsOpt = None,
    draft_length: opt.DraftLengthOpt = "adaptive",
    threshold: opt.ThresholdOpt = None,
    cloud_fraction: opt.CloudFractionOpt = None,
    router: opt.RouterOpt = None,
    split_layer: opt.SplitLayerOpt = None,
    compression: opt.CompressionOpt = None,
    exit_threshold: opt.ExitThresholdOpt = None,
    color: opt.ColorOpt = True,
) -> None:
    """Chat with the edge-cloud pair; tokens are coloured by where they came from.

    Without --server the default pair runs here: the edge model, and the cloud service in
    this process (offline). With --prompt (or when stdin is not a terminal) it answers one
    prompt and exits; stdin not a terminal and no --prompt answers a demo prompt. Every
    mode's flags may be given: they apply whenever the chat is in that mode (/mode).
    Every flag is checked before a model loads: bad input is one `error:` line and exit code 2.
    """
    knobs = ModeKnobs(draft_length=draft_length, threshold=threshold, cloud_fraction=cloud_fraction, router=router,
                      split_layer=split_layer, compression=compression, exit_threshold=exit_threshold)
    settings = validate(mode=mode, knobs=knobs, temperature=temperature, top_p=top_p, top_k=top_k, server=server,
                        server_key=server_key, keys=keys, token_env=token_env, strict_knobs=False)
    interactive = prompt is None and sys.stdin.isatty()
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    if prompt is not None and not prompt:
        fail("the prompt is empty")

    from rich.console import Console

    console = Console(highlight=False, no_color=not color, soft_wrap=not interactive)
    err = Console(stderr=True, highlight=False)
    try:
        t0 = time.perf_counter()
        if server is not None:
            err.print(f"[dim]connecting to {_escape(server)}…[/dim]")
        client = open_client(settings, edge_model=edge_model, cloud_model=cloud_model, edge_backend=edge_backend,
                             threads=threads, edge_only=False)
        if server is None and settings.mode.needs_cloud:
            err.print("[dim]starting the cloud service in this process…[/dim]")
            client.warm_up()
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    session = ChatSession(client, console, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=seed, system=system, settings=settings,
                          link=server or "in-process")
    try:
        if not interactive:
            question = prompt if prompt is not None else DEMO_PROMPT
            if prompt is None:
                err.print(f"[dim]stdin is not a terminal: answering the demo prompt ({DEMO_PROMPT!r}); "
                          "run `tether chat` in a terminal to chat, or pass --prompt[/dim]")
            if not session.ask(question):
                raise typer.Exit(1)
            return
        edge_name = client.aclient.edge.runtime.info.name
        cloud_name = server or (cloud_model or _default_cloud())
        console.print(f"[bold]Tether chat[/bold] · edge [bold]{_escape(edge_name)}[/bold] · cloud "
                      f"[bold]{_escape(cloud_name)}[/bold] · ready in {time.perf_counter() - t0:.1f}s")
        console.print(f"mode [bold]{mode}[/bold] · /help for commands · Ctrl-D or /quit to leave")
        console.print(legend())
        session.repl()
    finally:
        client.close()


def _default_cloud() -> str:
    from tether.models import DEFAULT_CLOUD_MODEL

    return f"{DEFAULT_CLOUD_MODEL} (in-process)"


def register(app: typer.Typer) -> None:
    """Add `tether chat` to the command line."""
    app.command("chat", cls=ModeCommand)(chat)

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

from tether.cli._generate import ORIGIN_STYLES as _GENERATE_STYLES

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from tether.edge import Client, GenerationStats

#: Colour of each `Origin` value (the four of `tether generate`, plus routing and split ones).
ORIGIN_STYLES: dict[str, str] = {**_GENERATE_STYLES, "edge-routed": "yellow", "edge-exit": "blue"}

ORIGIN_LABELS: dict[str, str] = {
    "edge-accepted": "edge, accepted by the cloud",
    "cloud-corrected": "cloud correction",
    "cloud-generated": "cloud",
    "edge-only": "edge alone",
    "edge-routed": "edge (router kept it)",
    "edge-exit": "edge early exit",
}

#: What `tether chat` answers when stdin is not a terminal and no --prompt is given.
DEMO_PROMPT = "Write a Python function that checks whether a number is prime."

#: Starting thresholds for the routing modes (docs/routing.md): route-query compares the
#: edge's mean draft log-probability, route-token the edge's top-token probability.
DEFAULT_THRESHOLDS: dict[str, float] = {"route-query": -0.35, "route-token": 0.6}

#: The conversation keeps at most this many messages (older turns are dropped first).
MAX_HISTORY_MESSAGES = 20

HELP = """\
[bold]Commands[/bold]
  /mode [MODE]        show or switch the mode: speculative, route-query, route-token, split, edge, cloud
  /threshold [VALUE]  show or set the threshold of the current mode
                      (route-query: mean draft log-prob, default -0.35; route-token: edge top-token
                      probability, default 0.6; split: early-exit confidence in (0, 1], or 'off')
  /stats              the last answer's statistics and the session's totals
  /reset              forget the conversation (and the session's totals)
  /help               this help
  /quit               leave (or Ctrl-D)
Ctrl-C stops an answer in progress; the conversation goes on without it.\
"""

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
    """One chat: the client, the conversation, the current mode and its thresholds.

    Args:
        client: a blocking `Client` (local or connected).
        console: where everything is printed.
        mode: the starting mode.
        max_new_tokens, temperature, seed, system: generation settings of every answer.
        threshold: the starting threshold of a routing mode (None: `DEFAULT_THRESHOLDS`).
        link: how the cloud is reached, for the status line (``"in-process"`` or a URL).
    """

    def __init__(self, client: Client, console: Console, *, mode: str, max_new_tokens: int,
                 temperature: float = 0.0, seed: int | None = None, system: str | None = None,
                 threshold: float | None = None, link: str = "in-process") -> None:
        self.client, self.console = client, console
        self.mode = mode
        self.max_new_tokens, self.temperature, self.seed, self.system = max_new_tokens, temperature, seed, system
        self.thresholds: dict[str, float | None] = {**DEFAULT_THRESHOLDS, "split": None}
        if threshold is not None:
            self.thresholds[mode] = threshold
        self.link = link
        self.history: list[dict[str, str]] = []
        self.last: GenerationStats | None = None
        self.totals = Totals()
        tok = client.aclient.edge.tokenizer
        self.multi_turn = bool(getattr(tok, "chat_template", None))

    # -- one answer ---------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        from tether.edge import SplitOptions
        from tether.routing import RoutingOptions

        kwargs: dict[str, Any] = dict(mode=self.mode, max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature, seed=self.seed, system=self.system)
        if self.mode in DEFAULT_THRESHOLDS:
            kwargs["routing"] = RoutingOptions(threshold=self.thresholds[self.mode])
        elif self.mode == "split":
            kwargs["split"] = SplitOptions(exit_threshold=self.thresholds["split"])
        return kwargs

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
            gen = self.client.stream(prompt, **self._kwargs())
            with gen:
                if self.console.is_terminal:
                    self._stream_live(gen, answer)
                else:
                    for tok in gen:
                        piece = printable(tok.text)
                        answer.append(piece, style=ORIGIN_STYLES.get(tok.origin.value))
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
                answer.append(printable(tok.text), style=ORIGIN_STYLES.get(tok.origin.value))
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
            style = ORIGIN_STYLES.get(origin, "")
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
        from tether.edge import MODES

        name, _, arg = line[1:].strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            self.console.print(HELP)
        elif name == "mode":
            if not arg:
                self.console.print(f"mode [bold]{self.mode}[/bold] (choose one of {', '.join(MODES)})")
            elif arg not in MODES:
                self.console.print(f"[red]unknown mode {_escape(arg)!r}[/red]; choose one of {', '.join(MODES)}")
            else:
                self.mode = arg
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
        if self.mode in self.thresholds:
            value = self.thresholds[self.mode]
            return f" (threshold {'off' if value is None else value}; /threshold to change)"
        return ""

    def _set_threshold(self, arg: str) -> None:
        if self.mode not in self.thresholds:
            self.console.print(f"mode {self.mode} has no threshold (route-query, route-token and split do)")
            return
        if not arg:
            self.console.print(f"{self.mode}:{self._threshold_note()}")
            return
        if self.mode == "split" and arg.lower() in ("off", "none"):
            self.thresholds["split"] = None
            self.console.print("split: early exit off")
            return
        try:
            value = float(arg)
        except ValueError:
            self.console.print(f"[red]not a number: {_escape(arg)!r}[/red]")
            return
        if self.mode == "split" and not 0.0 < value <= 1.0:
            self.console.print("[red]the split early-exit threshold is in (0, 1][/red]")
            return
        self.thresholds[self.mode] = value
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

    return Text(piece, style=ORIGIN_STYLES.get(origin, ""))


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

    line = Text("  ")
    for origin, label in ORIGIN_LABELS.items():
        line.append("■ ", style=ORIGIN_STYLES[origin])
        line.append(label + "  ", style="dim")
    return line


def chat(
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="Answer this one prompt and exit ('-' reads it from stdin).")] = None,
    mode: Annotated[str, typer.Option(
        "--mode", "-m", help="speculative, route-query, route-token, split, edge or cloud.")] = "speculative",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (sampling).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Threshold of the starting mode (route-query, route-token, split early exit).")] = None,
    server: Annotated[Optional[str], typer.Option(
        "--server", help="A `tether serve` URL (ws://host:port); default: the cloud runs in this process.")] = None,
    server_key: Annotated[Optional[str], typer.Option(
        "--server-key", help="The server's public key to pin (base64, or its public.key file), as `tether serve` "
        "prints it after 'clients pin this key:'.")] = None,
    edge_model: Annotated[Optional[str], typer.Option(
        "--edge-model", help="Edge model: registry name or Hugging Face model directory.")] = None,
    cloud_model: Annotated[Optional[str], typer.Option(
        "--cloud-model", help="Cloud model of the in-process cloud: registry name or model directory.")] = None,
    edge_backend: Annotated[str, typer.Option("--edge-backend", help="torch, onnx-int4, onnx-int8, onnx-fp32.")] = "torch",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Edge compute threads.")] = None,
    color: Annotated[bool, typer.Option("--color/--no-color", help="Colour tokens by origin.")] = True,
) -> None:
    """Chat with the edge-cloud pair; tokens are coloured by where they came from.

    Without --server the default pair runs here: the edge model, and the cloud service in
    this process (offline). With --prompt (or when stdin is not a terminal) it answers one
    prompt and exits; stdin not a terminal and no --prompt answers a demo prompt.
    """
    from rich.console import Console

    from tether.edge import MODES, Client
    from tether.errors import TetherError

    if mode not in MODES:
        raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}")
    if (server is None) != (server_key is None):
        raise typer.BadParameter("--server and --server-key go together")
    if threshold is not None and mode not in ("route-query", "route-token", "split"):
        raise typer.BadParameter("--threshold applies to route-query, route-token and split")
    interactive = prompt is None and sys.stdin.isatty()
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    console = Console(highlight=False, no_color=not color, soft_wrap=not interactive)
    err = Console(stderr=True, highlight=False)
    try:
        t0 = time.perf_counter()
        if server is not None:
            err.print(f"[dim]connecting to {_escape(server)}…[/dim]")
            client = _connect(server, server_key=server_key or "", edge_model=edge_model,
                              edge_backend=edge_backend, edge_threads=threads)
        else:
            client = Client.local(edge_model, cloud_model, edge_backend=edge_backend, edge_threads=threads)
            if mode != "edge":
                err.print("[dim]starting the cloud service in this process…[/dim]")
                client.warm_up()
    except TetherError as exc:
        err.print(f"[red]error:[/red] {_escape(str(exc))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    session = ChatSession(client, console, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed, system=system, threshold=threshold, link=server or "in-process")
    try:
        if not interactive:
            question = prompt if prompt is not None else DEMO_PROMPT
            if prompt is None:
                err.print(f"[dim]stdin is not a terminal: answering the demo prompt ({DEMO_PROMPT!r}); "
                          "run `tether chat` in a terminal to chat, or pass --prompt[/dim]")
            if not question:
                raise typer.BadParameter("the prompt is empty")
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


class _Connecting:
    """`EdgeClient.connect(...)` as both a zero-argument callable and an awaitable.

    `Client.connect` hands `Client` a callable, but `Client.__init__` awaits what it is given
    without calling it (a TypeError); this object works either way, so ``--server`` works
    before and after that is fixed.
    """

    def __init__(self, url: str, kwargs: dict[str, Any]) -> None:
        self.url, self.kwargs = url, kwargs

    def __call__(self) -> Any:
        from tether.edge import EdgeClient

        return EdgeClient.connect(self.url, **self.kwargs)

    def __await__(self) -> Any:
        return self().__await__()


def _connect(url: str, **kwargs: Any) -> Client:
    from tether.edge import Client

    return Client(_Connecting(url, kwargs))


def _default_cloud() -> str:
    from tether.models import DEFAULT_CLOUD_MODEL

    return f"{DEFAULT_CLOUD_MODEL} (in-process)"


def register(app: typer.Typer) -> None:
    """Add `tether chat` to the command line."""
    app.command("chat")(chat)

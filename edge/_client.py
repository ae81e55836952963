"""The SDK's front door: `EdgeClient` (asyncio) and `Client` (its blocking twin).

What belongs here: building a generation from a request (prompt, mode, sampling, stop)
— validating it, then wiring the strategy from injected parts — and the constructors
that find a cloud (`connect`, `local`). What does not: any decoding logic.

One asyncio core; `Client` runs it on a private event-loop thread, so background work
(reconnecting after a link drop) goes on between blocking calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tether.contract import SamplingParams
from tether.edge._connectors import LazyCloud
from tether.edge._edge_model import EdgeModel
from tether.edge.speculative._draft_length import DraftLengthPolicy
from tether.edge._link import EmulatedLink
from tether.edge._loop import Generation
from tether.edge._modes import BuildContext, GenerateArgs, GenerateOptions, get_mode
from tether.edge.minions._minions import run_ask
from tether.edge.minions._remote import ChatModel, SessionChat
from tether.edge.minions._types import AskResult, MinionsOptions
from tether.edge._proposer import DraftSettings
from tether.edge._remote import CloudConnector, ResilienceOptions
from tether.edge.speculative._strategy import SpeculativeOptions
from tether.edge.split._strategy import SplitOptions
from tether.edge.split._model import SplitModel, SplitModelSource
from tether.edge._stats import GenerationStats
from tether.edge._text import Prompt, build_prompt
from tether.edge._types import GenerationResult, Mode, StreamToken
from tether.errors import ConfigurationError
from tether.routing import RoutingOptions
from tether.protocol import KeyPair, LinkEmulator

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

T = TypeVar("T")


class EdgeClient:
    """The edge SDK (asyncio). Use it as an async context manager, or call `aclose()`.

    Args:
        edge: the edge model (see `EdgeModel.load`).
        cloud: where cloud sessions come from; None for an edge-only client (cloud and
            speculative modes then raise `ConfigurationError`).
        mode: the default mode of `generate` / `stream`.
        speculative: default speculative settings (draft length policy, pipelining).
        resilience: timeouts and what to do when the cloud is unreachable.
        routing: default routing settings (route-query / route-token modes).
        split: default split settings (``mode="split"``: split layer, compression, early exit).
        split_model: the device's half of the cloud's model for split mode (`SplitModel.load`);
            None shares the cloud's model when the cloud runs in this process (`local`).

    Most apps use `EdgeClient.local()` or `EdgeClient.connect(url, server_key=...)`.
    """

    def __init__(
        self,
        edge: EdgeModel,
        cloud: CloudConnector | None = None,
        *,
        mode: Mode = "speculative",
        speculative: SpeculativeOptions | None = None,
        resilience: ResilienceOptions | None = None,
        routing: RoutingOptions | None = None,
        split: SplitOptions | None = None,
        split_model: SplitModel | None = None,
    ) -> None:
        get_mode(mode)
        self.edge = edge
        self.cloud = cloud
        self.mode = mode
        self.speculative = speculative or SpeculativeOptions()
        self.routing = routing or RoutingOptions()
        self.resilience = resilience or ResilienceOptions()
        self.split = split or SplitOptions()
        self._split_source = SplitModelSource(split_model, cloud)
        self._closed = False

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def edge_only(
        cls, edge_model: str | EdgeModel | None = None, *, backend: str = "torch", threads: int | None = None
    ) -> EdgeClient:
        """A client with no cloud: only ``mode="edge"`` works. Loads the edge model now."""
        edge = edge_model if isinstance(edge_model, EdgeModel) else EdgeModel.load(edge_model, backend=backend, threads=threads)
        return cls(edge, None, mode="edge")

    @classmethod
    def local(
        cls,
        edge_model: str | EdgeModel | None = None,
        cloud_model: str | None = None,
        *,
        edge_backend: str = "torch",
        edge_threads: int | None = None,
        cloud_threads: int | None = None,
        link: LinkEmulator | None = None,
        mode: Mode = "speculative",
        speculative: SpeculativeOptions | None = None,
        resilience: ResilienceOptions | None = None,
        split: SplitOptions | None = None,
        split_model: SplitModel | None = None,
    ) -> EdgeClient:
        """The embedded default: the edge model here and the cloud service in this process.

        The cloud service is a real `CloudServer` on loopback (127.0.0.1, an ephemeral port
        and key pair), run on its own thread, and the edge reaches it through the encrypted
        protocol exactly as it would reach `tether serve`. The edge model loads now; the
        cloud model (default `DEFAULT_CLOUD_MODEL`) and its server start on the first
        request that needs them (so ``mode="edge"`` never pays for them), or when
        ``await client.warm_up()`` is called. `aclose()` stops the server.

        Args:
            edge_model: edge registry name, path, or a loaded `EdgeModel`.
            cloud_model: cloud registry name or path.
            edge_backend: runtime backend of the edge (``"torch"``, ``"onnx-int4"``, ...).
            edge_threads, cloud_threads: torch/onnx threads for each side (None: default).
            link: emulate a network (delay, jitter, bandwidth) on the loopback connection.
            mode, speculative, resilience, split, split_model: as for the constructor
                (split mode shares the in-process cloud model unless `split_model` is given).
        """
        edge = edge_model if isinstance(edge_model, EdgeModel) else EdgeModel.load(
            edge_model, backend=edge_backend, threads=edge_threads
        )

        async def build() -> CloudConnector:
            # Composition imports both rooms; imported here so `import tether.edge` loads no server.
            from tether.compose import LoopbackCloud

            return await LoopbackCloud.start(lambda: _load_cloud(cloud_model), threads=cloud_threads, link=link)

        return cls(edge, LazyCloud(build), mode=mode, speculative=speculative, resilience=resilience, split=split,
                   split_model=split_model)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        server_key: Any,
        edge_model: str | EdgeModel | None = None,
        edge_backend: str = "torch",
        edge_threads: int | None = None,
        client_keys: KeyPair | str | os.PathLike[str] | None = None,
        token: str | None = None,
        link: LinkEmulator | None = None,
        mode: Mode = "speculative",
        speculative: SpeculativeOptions | None = None,
        resilience: ResilienceOptions | None = None,
        routing: RoutingOptions | None = None,
        split: SplitOptions | None = None,
        split_model: SplitModel | None = None,
    ) -> EdgeClient:
        """Connect to a `tether serve` cloud over the encrypted protocol.

        The connection is made now, so a wrong URL, key or token fails here; later drops
        are handled per generation (see `ResilienceOptions`). A server started with
        ``--allow-clients`` serves only the devices on its allowlist, and one with
        ``TETHER_TOKEN`` set only those that send the token; the CLI's ``--keys DIR`` and
        ``TETHER_TOKEN`` / ``--token-env`` are, in the SDK::

            client = await EdgeClient.connect(
                "wss://cloud.example:8765", server_key="SHA256:...",
                client_keys=KeyPair.load("/etc/tether/device"),  # or the directory's path
                token=os.environ["TETHER_TOKEN"],
            )

        Args:
            url: ``ws://host:port`` (or ``wss://``).
            server_key: the server's public key to pin (text, key file, or its ``SHA256:``
                fingerprint).
            edge_model: edge registry name, path, or a loaded `EdgeModel`.
            edge_backend, edge_threads: as for `local`.
            client_keys: this device's identity: a `KeyPair`, or the directory / private.key
                file written by ``tether keys generate DIR`` (None: an ephemeral key, which
                only servers without an allowlist accept).
            token: the bearer token the server requires (its ``TETHER_TOKEN``), sent only
                inside the encrypted channel.
            link: emulate delay / jitter / bandwidth on the connection.
            mode, speculative, resilience, routing, split: as for the constructor.
            split_model: the device's half of the server's model; needed for ``mode="split"``.

        Raises:
            tether.protocol.UnknownClientKey: this device's key is not on the server's
                allowlist; the message gives the ``tether keys allow ...`` line that adds it.
            tether.protocol.BadToken: the token is missing or wrong.
            tether.protocol.KeyFileError: `client_keys` cannot be read.
            tether.contract.CloudError: the server cannot be reached or the handshake failed.
        """
        from tether.contract import CloudError
        from tether.edge._connect import connect_remote
        from tether.protocol import AuthenticationError

        try:
            cloud = await connect_remote(url, server_key=server_key, client_keys=client_keys, token=token, link=link)
        except CloudError as exc:
            # A refused identity or token is the caller's to fix: the protocol's typed error
            # says what to do (UnknownClientKey names the `tether keys allow` line).
            if isinstance(exc.__cause__, AuthenticationError):
                raise exc.__cause__ from None
            raise
        try:
            edge = edge_model if isinstance(edge_model, EdgeModel) else await asyncio.to_thread(
                EdgeModel.load, edge_model, backend=edge_backend, threads=edge_threads
            )
        except BaseException:
            await cloud.aclose()
            raise
        return cls(edge, cloud, mode=mode, speculative=speculative, resilience=resilience, routing=routing,
                   split=split, split_model=split_model)

    async def warm_up(self) -> None:
        """Start the cloud now if it is started lazily (no-op otherwise)."""
        inner = self.cloud.inner if isinstance(self.cloud, EmulatedLink) else self.cloud
        if isinstance(inner, LazyCloud):
            await inner.get()

    # -- context management --------------------------------------------------------------

    async def __aenter__(self) -> EdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the cloud connection; the edge model stays usable by other clients."""
        if self._closed:
            return
        self._closed = True
        self._split_source.close()
        if self.cloud is not None:
            await self.cloud.aclose()

    # -- generation ----------------------------------------------------------------------

    def stream(self, prompt: Prompt, options: GenerateOptions | None = None, /,
               **changes: Unpack[GenerateArgs]) -> Generation:
        """Start a generation and iterate its tokens as they are committed.

        ``async for tok in client.stream(...)`` yields `StreamToken`s (id, text, origin);
        afterwards the iterator's ``.result`` holds the `GenerationResult` with stats.
        Arguments as for `generate`.

        Raises:
            ConfigurationError, ValueError: a bad argument (before anything runs).
            ContextLengthExceeded: the prompt is longer than the edge model's positions (here)
                or the cloud session's ``max_tokens`` (when the generation starts); nothing
                was computed.
        """
        opts = (options or GenerateOptions()).with_changes(changes)
        spec = get_mode(opts.mode or self.mode)
        if self._closed:
            raise ConfigurationError("this client is closed")
        if spec.needs_cloud and self.cloud is None:
            raise ConfigurationError(
                f"mode {spec.name!r} needs a cloud: use EdgeClient.local() or EdgeClient.connect(url, server_key=...)"
            )
        prompt_ids = build_prompt(self.edge.tokenizer, prompt, chat_template=opts.chat_template, system=opts.system)
        stats = spec.stats_type(mode=spec.name)
        mode_options = None
        if spec.options_field is not None:
            mode_options = getattr(opts, spec.options_field) or getattr(self, spec.options_field)
        strategy = spec.build(BuildContext(
            edge=self.edge, cloud=self.cloud, resilience=self.resilience, stats=stats,
            settings=DraftSettings(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p),
            sampling=SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed),
            seed=opts.seed, options=mode_options, prompt=prompt, policy=self._policy,
            split_source=self._split_source, default_threshold=spec.default_threshold,
        ))
        return Generation(
            strategy,
            tokenizer=self.edge.tokenizer,
            prompt_ids=prompt_ids,
            max_new_tokens=opts.max_new_tokens,
            eos_ids=self.edge.eos_token_ids,
            stop=opts.stops,
            stats=stats,
            # The edge model holds the whole sequence in these modes; cloud and split do not use it.
            max_context=None if spec.name in ("cloud", "split") else self.edge.runtime.info.max_positions,
        )

    async def generate(self, prompt: Prompt, options: GenerateOptions | None = None, /,
                       **changes: Unpack[GenerateArgs]) -> GenerationResult:
        """Generate a completion.

        Settings come as a `GenerateOptions` and/or as its fields by keyword (keywords win):
        ``generate("hi", mode="cloud", max_new_tokens=32)`` or ``generate("hi", opts)``.

        Args:
            prompt: a string (sent through the chat template when the tokenizer has one)
                or OpenAI-style messages.
            options: the generation's settings (`GenerateOptions`: mode, max_new_tokens,
                temperature, top_p, top_k, seed, stop, chat_template, system, and the
                speculative / routing / split settings of those modes). Unset: defaults,
                and the client's mode and mode settings.
            **changes: any `GenerateOptions` field, replacing the one in `options`.

        Returns:
            `GenerationResult` with text, token ids, origins, finish reason and stats.

        Raises:
            ConfigurationError, ValueError: a bad argument; nothing ran.
            ContextLengthExceeded: the prompt does not fit the edge model or the cloud
                session (``prompt_tokens``, ``limit``); nothing was computed. A generation
                that reaches the limit is not an error: it ends with ``finish_reason="length"``.
            CloudUnavailableError: the cloud link failed and ``on_disconnect="raise"``.
        """
        return await self.stream(prompt, options, **changes).collect()

    # -- Minion / MinionS: the document stays here, the cloud plans --------------------

    async def ask(
        self,
        task: str,
        *,
        documents: Sequence[str],
        mode: str = "minions",
        max_rounds: int = 3,
        remote: ChatModel | None = None,
        options: MinionsOptions | None = None,
    ) -> AskResult:
        """Answer a task about private documents without sending them (Minion / MinionS).

        The remote model plans and reasons; the edge model reads the documents. Only the
        task, chunk counts and what the edge model writes leave the device (docs/minions.md).

        Args:
            task: the question or instruction.
            documents: the private texts (they never leave the device).
            mode: ``"minions"`` (the cloud plans jobs that the edge runs over chunks, in
                parallel) or ``"minion"`` (the cloud questions the edge, which reads everything).
            max_rounds: most rounds of edge work; after the last the cloud must answer.
            remote: the remote model; default the client's cloud (its chat operation).
                Pass `OpenAIChat(...)` for any OpenAI-compatible endpoint.
            options: sizes, limits and prices (`MinionsOptions`).

        Returns:
            `AskResult`: the answer, the round-by-round transcript, and `cost`.

        Raises:
            ConfigurationError, ValueError: a bad argument, or no remote model; nothing was sent.
            MinionsFailed: the remote's replies broke the schema even after one re-ask; its
                ``partial`` holds the transcript. The client stays usable.
            CloudUnavailableError, RemoteChatError: the remote model failed or refused.
        """
        if self._closed:
            raise ConfigurationError("this client is closed")
        owned: SessionChat | None = None
        if remote is None:
            if self.cloud is None:
                raise ConfigurationError(
                    "ask needs a remote model: use EdgeClient.local() / connect(), or pass remote=OpenAIChat(...)"
                )
            remote = owned = SessionChat(self.cloud)
        try:
            return await run_ask(self.edge, remote, task, documents, mode=mode, max_rounds=max_rounds,
                                 options=options)
        finally:
            if owned is not None:
                await owned.aclose()

    # -- wiring (each mode's builder in `MODE_REGISTRY` wires its strategy from injected parts) --

    def _policy(self, options: SpeculativeOptions) -> DraftLengthPolicy:
        """One draft-length policy per client and settings: what it learns (the cloud's
        verify-cost curve, the draft speed, the acceptance rate as a prior) carries over
        from one generation to the next."""
        policies: dict[SpeculativeOptions, DraftLengthPolicy] = self.__dict__.setdefault("_policies", {})
        if options not in policies:
            policies[options] = options.make_policy()
        return policies[options]


def _load_cloud(cloud_model: str | None) -> tuple[Any, Any, str]:
    """Load the local cloud's runtime (torch): ``(runtime, tokenizer, name)``."""
    from tether.runtime import load_runtime

    if cloud_model is None:
        from tether.models import DEFAULT_CLOUD_MODEL

        cloud_model = DEFAULT_CLOUD_MODEL
    runtime, tokenizer = load_runtime(cloud_model, "torch")
    return runtime, tokenizer, cloud_model


class SyncGeneration:
    """A blocking iterator over a generation's tokens; ``.result`` once it is done.

    Closing it (``close()``, leaving a ``with`` block, or Ctrl-C while iterating) stops the
    generation cleanly.
    """

    def __init__(self, client: Client, gen: Generation) -> None:
        self._client = client
        self._gen = gen

    def __iter__(self) -> Iterator[StreamToken]:
        return self

    def __next__(self) -> StreamToken:
        try:
            return self._client._call(self._gen.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SyncGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the generation (if still running) and release its state."""
        with contextlib.suppress(Exception):
            self._client._call(self._gen.aclose())

    @property
    def stats(self) -> GenerationStats:
        """Live stats of the generation."""
        return self._gen.stats

    @property
    def result(self) -> GenerationResult:
        """The finished result; see `Generation.result`."""
        return self._gen.result


class Client:
    """The blocking edge SDK: the same API as `EdgeClient`, without ``await``.

    Runs an `EdgeClient` on a private event-loop thread. Use it as a context manager or
    call `close()`.
    """

    def __init__(self, build: Callable[[], Awaitable[EdgeClient]] | EdgeClient) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tether-client", daemon=True)
        self._thread.start()
        try:
            if isinstance(build, EdgeClient):
                self.aclient = build
            else:
                self.aclient = self._call(_await(build()))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    @classmethod
    def edge_only(cls, edge_model: str | EdgeModel | None = None, *, backend: str = "torch",
                  threads: int | None = None) -> Client:
        """See `EdgeClient.edge_only`."""
        return cls(EdgeClient.edge_only(edge_model, backend=backend, threads=threads))

    @classmethod
    def local(cls, edge_model: str | EdgeModel | None = None, cloud_model: str | None = None, *,
              lazy: bool = True, **kwargs: Any) -> Client:
        """See `EdgeClient.local`."""
        client = cls(EdgeClient.local(edge_model, cloud_model, **kwargs))
        if not lazy:
            client.warm_up()
        return client

    @classmethod
    def connect(cls, url: str, *, server_key: Any, **kwargs: Any) -> Client:
        """See `EdgeClient.connect` (same arguments). With this device's key pair and token
        (what ``tether chat --server URL --keys DIR`` sends, the token from ``TETHER_TOKEN``)::

            client = Client.connect(url, server_key=key, client_keys=KeyPair.load("DIR"),
                                    token=os.environ["TETHER_TOKEN"])

        Raises:
            tether.protocol.UnknownClientKey: not on the server's allowlist (the message has
                the ``tether keys allow ...`` line to run there); BadToken: wrong token.
        """
        return cls(lambda: EdgeClient.connect(url, server_key=server_key, **kwargs))

    def warm_up(self) -> None:
        """See `EdgeClient.warm_up`."""
        self._call(self.aclient.warm_up())

    def generate(self, prompt: Prompt, options: GenerateOptions | None = None, /,
                 **changes: Unpack[GenerateArgs]) -> GenerationResult:
        """See `EdgeClient.generate`."""
        gen = self.aclient.stream(prompt, options, **changes)
        return self._call(gen.collect())

    def stream(self, prompt: Prompt, options: GenerateOptions | None = None, /,
               **changes: Unpack[GenerateArgs]) -> SyncGeneration:
        """See `EdgeClient.stream`; returns a blocking iterator of `StreamToken`s."""
        return SyncGeneration(self, self.aclient.stream(prompt, options, **changes))

    def ask(self, task: str, *, documents: Sequence[str], mode: str = "minions", max_rounds: int = 3,
            remote: ChatModel | None = None, options: MinionsOptions | None = None) -> AskResult:
        """See `EdgeClient.ask` (Minion / MinionS)."""
        return self._call(self.aclient.ask(task, documents=documents, mode=mode, max_rounds=max_rounds,
                                           remote=remote, options=options))

    def close(self) -> None:
        """Close the client and stop its event-loop thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self.aclient.aclose())
        self._stop_loop()

    def _stop_loop(self) -> None:
        # Like asyncio.run: cancel what is still pending (e.g. a refused connection's tasks),
        # so that closing the loop destroys no pending task.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(aw: Awaitable[T]) -> T:
    return await aw


async def _cancel_pending() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

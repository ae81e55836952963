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
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from tether.cloud import SamplingParams
from tether.edge._connectors import LazyCloud, LoopbackCloud
from tether.edge._edge_model import EdgeModel
from tether.edge.speculative._draft_length import DraftLengthPolicy
from tether.edge._link import EmulatedLink
from tether.edge._loop import Generation
from tether.edge.minions._minions import run_ask
from tether.edge.minions._remote import ChatModel, SessionChat
from tether.edge.minions._types import AskResult, MinionsOptions
from tether.edge._proposer import DraftSettings, EdgeDrafter
from tether.edge._remote import CloudConnector, CloudLink, ResilienceOptions
from tether.edge.route._strategies import ROUTING_MODES, RoutingStats, build_routing_strategy, query_text
from tether.edge.speculative._strategy import CloudScorer, SpeculativeOptions, SpeculativeStrategy
from tether.edge.split._strategy import SplitOptions, SplitStats, SplitStrategy
from tether.edge.split._model import SplitModel, SplitModelSource
from tether.edge._stats import GenerationStats
from tether.edge._strategies import CloudStrategy, EdgeFallback, EdgeStrategy, Strategy
from tether.edge._text import Prompt, build_prompt
from tether.edge._types import MODES, GenerationResult, StreamToken
from tether.errors import ConfigurationError
from tether.routing._options import RoutingOptions
from tether.protocol import LinkEmulator
from tether.sampling import make_generator, validate_warp

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
        mode: str = "speculative",
        speculative: SpeculativeOptions | None = None,
        resilience: ResilienceOptions | None = None,
        routing: RoutingOptions | None = None,
        split: SplitOptions | None = None,
        split_model: SplitModel | None = None,
    ) -> None:
        _check_mode(mode)
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
        mode: str = "speculative",
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
        client_keys: Any = None,
        token: str | None = None,
        link: LinkEmulator | None = None,
        mode: str = "speculative",
        speculative: SpeculativeOptions | None = None,
        resilience: ResilienceOptions | None = None,
        split: SplitOptions | None = None,
        split_model: SplitModel | None = None,
    ) -> EdgeClient:
        """Connect to a `tether serve` cloud over the encrypted protocol.

        The connection is made now, so a wrong URL or key fails here; later drops are
        handled per generation (see `ResilienceOptions`).

        Args:
            url: ``ws://host:port`` (or ``wss://``).
            server_key: the server's public key to pin (text or key file).
            edge_model: edge registry name, path, or a loaded `EdgeModel`.
            edge_backend, edge_threads: as for `local`.
            client_keys: this device's `KeyPair` or key file (None: an ephemeral key).
            token: bearer token the server may require.
            link: emulate delay / jitter / bandwidth on the connection.
            mode, speculative, resilience, split: as for the constructor.
            split_model: the device's half of the server's model; needed for ``mode="split"``.

        Raises:
            tether.cloud.CloudError: the server cannot be reached or refused the client.
        """
        from tether.edge._connect import connect_remote

        cloud = await connect_remote(url, server_key=server_key, client_keys=client_keys, token=token, link=link)
        try:
            edge = edge_model if isinstance(edge_model, EdgeModel) else await asyncio.to_thread(
                EdgeModel.load, edge_model, backend=edge_backend, threads=edge_threads
            )
        except BaseException:
            await cloud.aclose()
            raise
        return cls(edge, cloud, mode=mode, speculative=speculative, resilience=resilience, split=split,
                   split_model=split_model)

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

    def stream(
        self,
        prompt: Prompt,
        *,
        mode: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat_template: bool | None = None,
        system: str | None = None,
        speculative: SpeculativeOptions | None = None,
        routing: RoutingOptions | None = None,
        split: SplitOptions | None = None,
    ) -> Generation:
        """Start a generation and iterate its tokens as they are committed.

        ``async for tok in client.stream(...)`` yields `StreamToken`s (id, text, origin);
        afterwards the iterator's ``.result`` holds the `GenerationResult` with stats.
        Arguments as for `generate`.

        Raises:
            ConfigurationError, ValueError: a bad argument (before anything runs).
        """
        mode = mode or self.mode
        _check_mode(mode)
        if self._closed:
            raise ConfigurationError("this client is closed")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        validate_warp(temperature=temperature, top_k=top_k, top_p=top_p)
        if mode != "edge" and self.cloud is None:
            raise ConfigurationError(
                f"mode {mode!r} needs a cloud: use EdgeClient.local() or EdgeClient.connect(url, server_key=...)"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        prompt_ids = build_prompt(self.edge.tokenizer, prompt, chat_template=chat_template, system=system)
        stats: GenerationStats
        if mode in ROUTING_MODES:
            stats = RoutingStats(mode=mode)
        elif mode == "split":
            stats = SplitStats(mode=mode)
        else:
            stats = GenerationStats(mode=mode)
        strategy = self._build(
            mode,
            stats=stats,
            settings=DraftSettings(temperature=temperature, top_k=top_k, top_p=top_p),
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            seed=seed,
            speculative=speculative or self.speculative,
            routing=routing or self.routing,
            prompt=prompt,
            split=split or self.split,
        )
        return Generation(
            strategy,
            tokenizer=self.edge.tokenizer,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            eos_ids=self.edge.eos_token_ids,
            stop=stops,
            stats=stats,
        )

    async def generate(
        self,
        prompt: Prompt,
        *,
        mode: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat_template: bool | None = None,
        system: str | None = None,
        speculative: SpeculativeOptions | None = None,
        routing: RoutingOptions | None = None,
        split: SplitOptions | None = None,
    ) -> GenerationResult:
        """Generate a completion.

        Args:
            prompt: a string (sent through the chat template when the tokenizer has one)
                or OpenAI-style messages.
            mode: ``"edge"``, ``"cloud"``, ``"speculative"``, ``"route-query"``,
                ``"route-token"`` or ``"split"`` (default: the client's).
            max_new_tokens: the most tokens to generate.
            temperature: 0 (default) for greedy decoding; > 0 samples. Speculative
                output has exactly the cloud model's distribution either way.
            top_p, top_k: nucleus / top-k truncation (1 and 0 disable them).
            seed: seeds the edge's and the cloud's random generators.
            stop: stop string(s); the text ends before the first one found.
            chat_template: force (True) or skip (False) the chat template for a string.
            system: a system message to put first.
            speculative: per-call speculative settings.
            routing: per-call routing settings (``route-query`` / ``route-token``: the
                router and its threshold or cloud fraction; see `tether.routing`).
            split: per-call split settings (``split``: the split layer or ``"auto"``, the
                hidden-state compression, early exit; see `SplitOptions`). Split mode sends
                hidden states, never token ids (docs/split.md).

        Returns:
            `GenerationResult` with text, token ids, origins, finish reason and stats.

        Raises:
            ConfigurationError, ValueError: a bad argument; nothing ran.
            CloudUnavailableError: the cloud failed and ``on_disconnect="raise"``.
        """
        gen = self.stream(
            prompt, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop, chat_template=chat_template, system=system,
            speculative=speculative, routing=routing, split=split,
        )
        return await gen.collect()

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

    # -- wiring (the factory: every part is injected here, so tests can swap any) -------

    def _policy(self, options: SpeculativeOptions) -> DraftLengthPolicy:
        """One draft-length policy per client and settings: what it learns (the cloud's
        verify-cost curve, the draft speed, the acceptance rate as a prior) carries over
        from one generation to the next."""
        policies: dict[SpeculativeOptions, DraftLengthPolicy] = self.__dict__.setdefault("_policies", {})
        if options not in policies:
            policies[options] = options.make_policy()
        return policies[options]

    def _build(
        self,
        mode: str,
        *,
        stats: GenerationStats,
        settings: DraftSettings,
        sampling: SamplingParams,
        seed: int | None,
        speculative: SpeculativeOptions,
        routing: RoutingOptions | None = None,
        prompt: Prompt = "",
        split: SplitOptions | None = None,
    ) -> Strategy:
        edge_seed = None if seed is None else (seed * 1_000_003 + 7) % (2**63)
        drafter = EdgeDrafter(self.edge.runtime, settings, make_generator(edge_seed))
        if mode == "edge":
            return EdgeStrategy(self.edge, drafter, stats)
        assert self.cloud is not None
        fallback = EdgeFallback(self.edge, drafter, stats)

        def make_cloud() -> CloudStrategy:
            assert self.cloud is not None
            ids: list[int] = []
            link = CloudLink(self.cloud, sampling, self.resilience, stats, lambda: ids)
            return CloudStrategy(link, fallback, stats, self.edge.eos_token_ids, ids)

        if mode == "cloud":
            return make_cloud()
        if mode == "split":
            assert isinstance(stats, SplitStats)
            # No committed ids for the link: a split session is never sent token ids, and a
            # fresh session after a reconnect is refilled with hidden rows by the strategy.
            split_link = CloudLink(self.cloud, sampling, self.resilience, stats, lambda: ())
            return SplitStrategy(
                source=self._split_source, link=split_link, fallback=fallback, options=split or self.split,
                stats=stats, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                generator=make_generator(edge_seed),
            )
        if mode in ROUTING_MODES:
            cloud = self.cloud
            return build_routing_strategy(
                mode, edge=self.edge, options=routing or self.routing, stats=stats, settings=settings,
                generator=make_generator(edge_seed), query_text=query_text(prompt),
                make_link=lambda committed: CloudLink(cloud, sampling, self.resilience, stats, committed),
                make_cloud=make_cloud,
            )
        holder: list[SpeculativeStrategy] = []
        link = CloudLink(self.cloud, sampling, self.resilience, stats, lambda: holder[0].committed_ids())
        strategy = SpeculativeStrategy(
            edge=self.edge,
            drafter=drafter,
            scorer=CloudScorer(link),
            link=link,
            fallback=fallback,
            policy=self._policy(speculative),
            options=speculative,
            stats=stats,
            eos_ids=self.edge.eos_token_ids,
            greedy=settings.greedy,
        )
        holder.append(strategy)
        return strategy


def _load_cloud(cloud_model: str | None) -> tuple[Any, Any, str]:
    """Load the local cloud's runtime (torch): ``(runtime, tokenizer, name)``."""
    from tether.runtime._loader import load_runtime

    if cloud_model is None:
        from tether.models import DEFAULT_CLOUD_MODEL

        cloud_model = DEFAULT_CLOUD_MODEL
    runtime, tokenizer = load_runtime(cloud_model, "torch")
    return runtime, tokenizer, cloud_model


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigurationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


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
        """See `EdgeClient.connect`."""
        return cls(lambda: EdgeClient.connect(url, server_key=server_key, **kwargs))

    def warm_up(self) -> None:
        """See `EdgeClient.warm_up`."""
        self._call(self.aclient.warm_up())

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """See `EdgeClient.generate`."""
        gen = self.aclient.stream(prompt, **kwargs)
        return self._call(gen.collect())

    def stream(self, prompt: Prompt, **kwargs: Any) -> SyncGeneration:
        """See `EdgeClient.stream`; returns a blocking iterator of `StreamToken`s."""
        return SyncGeneration(self, self.aclient.stream(prompt, **kwargs))

    def ask(self, task: str, **kwargs: Any) -> AskResult:
        """See `EdgeClient.ask` (Minion / MinionS)."""
        return self._call(self.aclient.ask(task, **kwargs))

    def close(self) -> None:
        """Close the client and stop its event-loop thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self.aclient.aclose())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(aw: Awaitable[T]) -> T:
    return await aw

"""The generation modes, declared once: one `ModeSpec` per mode in `MODE_REGISTRY`.

What belongs here: for each mode its strategy builder, stats type, options type (and the
`GenerateOptions` field holding it), the CLI flags that tune it, the origins it commits
(with their colours) and its default threshold; plus `GenerateOptions`, the per-call
settings of `generate` / `stream`. `EdgeClient`, `tether generate` and `tether chat` read
this table; adding a mode is one entry here. What does not: the strategies themselves
(`_strategies.py`, `speculative/`, `route/`, `split/`) and the decoding loop (`_loop.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast

from tether.contract import SamplingParams
from tether.edge._edge_model import EdgeModel
from tether.edge._proposer import DraftSettings, EdgeDrafter
from tether.edge._remote import CloudConnector, CloudLink, ResilienceOptions
from tether.edge._stats import GenerationStats
from tether.edge._strategies import CloudStrategy, EdgeFallback, EdgeStrategy, Strategy
from tether.edge._text import Prompt
from tether.edge._types import Mode, Origin
from tether.edge.route._strategies import RoutingStats, build_routing_strategy, query_text
from tether.edge.speculative._draft_length import DraftLengthPolicy
from tether.edge.speculative._strategy import CloudScorer, SpeculativeOptions, SpeculativeStrategy
from tether.edge.split._model import SplitModelSource
from tether.edge.split._strategy import SplitOptions, SplitStats, SplitStrategy
from tether.errors import ConfigurationError
from tether.routing import RoutingOptions
from tether.sampling import make_generator, validate_warp

OptionsField = Literal["speculative", "routing", "split"]

#: Terminal colour (rich style) and legend label of every `Origin`.
ORIGIN_STYLES: Mapping[Origin, str] = {
    Origin.EDGE_ACCEPTED: "green",
    Origin.CLOUD_CORRECTED: "bold red",
    Origin.CLOUD_GENERATED: "cyan",
    Origin.EDGE_ONLY: "magenta",
    Origin.EDGE_ROUTED: "yellow",
    Origin.EDGE_EXIT: "blue",
}
ORIGIN_LABELS: Mapping[Origin, str] = {
    Origin.EDGE_ACCEPTED: "edge, accepted by the cloud",
    Origin.CLOUD_CORRECTED: "cloud correction",
    Origin.CLOUD_GENERATED: "cloud",
    Origin.EDGE_ONLY: "edge alone",
    Origin.EDGE_ROUTED: "edge (router kept it)",
    Origin.EDGE_EXIT: "edge early exit",
}


# -- per-call settings -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateOptions:
    """The settings of one generation (`EdgeClient.generate` / `stream`); validated when built.

    Attributes:
        mode: a mode of `MODE_REGISTRY` (None: the client's default).
        max_new_tokens: the most tokens to generate (>= 1).
        temperature: 0 (default) for greedy decoding; > 0 samples. Speculative output has
            exactly the cloud model's distribution either way.
        top_p, top_k: nucleus / top-k truncation (1 and 0 disable them).
        seed: seeds the edge's and the cloud's random generators.
        stop: stop string(s); the text ends before the first one found.
        chat_template: force (True) or skip (False) the chat template for a string prompt.
        system: a system message to put first.
        speculative: speculative settings (None: the client's).
        routing: route-query / route-token settings: the router and its threshold or cloud
            fraction (None: the client's; see `tether.routing.RoutingOptions`).
        split: split settings: the split layer or ``"auto"``, the hidden-state compression,
            early exit (None: the client's; see `SplitOptions`). Split mode sends hidden
            states, never token ids (docs/split.md).

    Raises:
        ConfigurationError, ValueError: a bad value (unknown mode, ``max_new_tokens < 1``,
            bad sampling parameters).
    """

    mode: Mode | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    chat_template: bool | None = None
    system: str | None = None
    speculative: SpeculativeOptions | None = None
    routing: RoutingOptions | None = None
    split: SplitOptions | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            get_mode(self.mode)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        validate_warp(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def stops(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def with_changes(self, changes: GenerateArgs) -> GenerateOptions:
        """A copy with the given fields replaced (validated again)."""
        return dataclasses.replace(self, **changes) if changes else self


class GenerateArgs(TypedDict, total=False):
    """`GenerateOptions`' fields as keyword arguments of `generate` / `stream` (same meaning)."""

    mode: Mode | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: str | Sequence[str] | None
    chat_template: bool | None
    system: str | None
    speculative: SpeculativeOptions | None
    routing: RoutingOptions | None
    split: SplitOptions | None


# -- what a builder is given ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildContext:
    """Everything a mode's builder may wire its strategy from (the client's factory makes it).

    Attributes:
        edge: the edge model.
        cloud: where cloud sessions come from (None for an edge-only client).
        resilience: timeouts and the disconnect policy of every cloud link.
        stats: the generation's stats, of the mode's `ModeSpec.stats_type`.
        settings: the edge's warping (the cloud's sampling, mirrored).
        sampling: the cloud session's sampling parameters.
        seed: the generation's seed (the edge derives its own from it).
        options: the mode's options (of `ModeSpec.options_type`; None for modes without).
        prompt: the prompt as given (route-query reads its text).
        policy: the client's draft-length policy for speculative settings (learned across calls).
        split_source: where split mode's device half comes from.
        default_threshold: the mode's default threshold.
    """

    edge: EdgeModel
    cloud: CloudConnector | None
    resilience: ResilienceOptions
    stats: GenerationStats
    settings: DraftSettings
    sampling: SamplingParams
    seed: int | None
    options: Any
    prompt: Prompt
    policy: Callable[[SpeculativeOptions], DraftLengthPolicy]
    split_source: SplitModelSource
    default_threshold: float | None

    @property
    def edge_seed(self) -> int | None:
        """The edge's seed: derived from `seed` so the two sides' random streams differ."""
        return None if self.seed is None else (self.seed * 1_000_003 + 7) % (2**63)

    def drafter(self) -> EdgeDrafter:
        return EdgeDrafter(self.edge.runtime, self.settings, make_generator(self.edge_seed))

    def connector(self) -> CloudConnector:
        if self.cloud is None:  # `EdgeClient.stream` checks `needs_cloud` before building
            raise ConfigurationError("this mode needs a cloud")
        return self.cloud

    def link(self, committed: Callable[[], Sequence[int]]) -> CloudLink:
        """A cloud link for this generation; `committed` gives the ids to re-sync a fresh session."""
        return CloudLink(self.connector(), self.sampling, self.resilience, self.stats, committed)

    def cloud_strategy(self, fallback: EdgeFallback) -> CloudStrategy:
        ids: list[int] = []
        return CloudStrategy(self.link(lambda: ids), fallback, self.stats, self.edge.eos_token_ids, ids)


# -- the builders --------------------------------------------------------------------------


def _build_edge(ctx: BuildContext) -> Strategy:
    return EdgeStrategy(ctx.edge, ctx.drafter(), ctx.stats)


def _build_cloud(ctx: BuildContext) -> Strategy:
    return ctx.cloud_strategy(EdgeFallback(ctx.edge, ctx.drafter(), ctx.stats))


def _build_speculative(ctx: BuildContext) -> Strategy:
    options = cast(SpeculativeOptions, ctx.options)
    drafter = ctx.drafter()
    holder: list[SpeculativeStrategy] = []
    link = ctx.link(lambda: holder[0].committed_ids())
    strategy = SpeculativeStrategy(
        edge=ctx.edge, drafter=drafter, scorer=CloudScorer(link), link=link,
        fallback=EdgeFallback(ctx.edge, drafter, ctx.stats), policy=ctx.policy(options), options=options,
        stats=ctx.stats, eos_ids=ctx.edge.eos_token_ids, greedy=ctx.settings.greedy,
    )
    holder.append(strategy)
    return strategy


def _build_routing(mode: str) -> Callable[[BuildContext], Strategy]:
    def build(ctx: BuildContext) -> Strategy:
        drafter = ctx.drafter()
        fallback = EdgeFallback(ctx.edge, drafter, ctx.stats)
        return build_routing_strategy(
            mode, edge=ctx.edge, options=cast(RoutingOptions, ctx.options), stats=ctx.stats,
            settings=ctx.settings, generator=make_generator(ctx.edge_seed), query_text=query_text(ctx.prompt),
            make_link=ctx.link, make_cloud=lambda: ctx.cloud_strategy(fallback),
            default_threshold=ctx.default_threshold,
        )

    return build


def _build_split(ctx: BuildContext) -> Strategy:
    assert isinstance(ctx.stats, SplitStats)
    # No committed ids for the link: a split session is never sent token ids, and a fresh
    # session after a reconnect is refilled with hidden rows by the strategy.
    return SplitStrategy(
        source=ctx.split_source, link=ctx.link(lambda: ()),
        fallback=EdgeFallback(ctx.edge, ctx.drafter(), ctx.stats), options=cast(SplitOptions, ctx.options),
        stats=ctx.stats, temperature=ctx.settings.temperature, top_k=ctx.settings.top_k,
        top_p=ctx.settings.top_p, generator=make_generator(ctx.edge_seed),
    )


# -- the registry --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeSpec:
    """One generation mode.

    Attributes:
        name: the mode's name (``mode=...``, ``--mode``).
        summary: one line for help texts.
        needs_cloud: False only for ``edge``.
        build: wires the mode's strategy from a `BuildContext`.
        stats_type: the `GenerationStats` class its generations record into.
        options_field: the `GenerateOptions` (and `EdgeClient`) field holding its options,
            None for a mode without options.
        options_type: the class of those options.
        threshold_field: the field of `options_type` that ``--threshold`` and the chat's
            ``/threshold`` set (None: the mode has no threshold).
        default_threshold: the threshold used when none is given (None: off / none).
        threshold_help: what the threshold means and its range.
        knobs: the CLI flags that tune this mode (`tether generate` / `tether chat`).
        origins: the origins its tokens can carry.
    """

    name: Mode
    summary: str
    needs_cloud: bool
    build: Callable[[BuildContext], Strategy]
    stats_type: type[GenerationStats] = GenerationStats
    options_field: OptionsField | None = None
    options_type: type | None = None
    threshold_field: str | None = None
    default_threshold: float | None = None
    threshold_help: str = ""
    knobs: tuple[str, ...] = ()
    origins: tuple[Origin, ...] = ()

    @property
    def origin_styles(self) -> dict[Origin, str]:
        """The colour of each origin this mode can produce."""
        return {o: ORIGIN_STYLES[o] for o in self.origins}

    def options_with_threshold(self, options: Any, threshold: float | None) -> Any:
        """`options` with the mode's threshold set (None: the default / off).

        Raises:
            ConfigurationError: the mode has no threshold, or the value is out of range.
        """
        if self.threshold_field is None:
            raise ConfigurationError(f"mode {self.name} has no threshold")
        if self.options_field == "routing" and threshold is not None:
            return dataclasses.replace(options, threshold=threshold, cloud_fraction=None)
        return dataclasses.replace(options, **{self.threshold_field: threshold})


_FALLBACK = (Origin.EDGE_ONLY,)  # any cloud-backed mode, while its link is down

MODE_REGISTRY: Mapping[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec(
            name="speculative", summary="the edge drafts, the cloud verifies: the cloud model's output",
            needs_cloud=True, build=_build_speculative, options_field="speculative", options_type=SpeculativeOptions,
            knobs=("--draft-length",),
            origins=(Origin.EDGE_ACCEPTED, Origin.CLOUD_CORRECTED, Origin.CLOUD_GENERATED, *_FALLBACK),
        ),
        ModeSpec(
            name="route-query", summary="a router sends each whole query to the edge or to the cloud",
            needs_cloud=True, build=_build_routing("route-query"), stats_type=RoutingStats, options_field="routing",
            options_type=RoutingOptions, threshold_field="threshold", default_threshold=-0.35,
            threshold_help="the edge's mean draft log-prob; below it the query goes to the cloud",
            knobs=("--router", "--threshold", "--cloud-fraction"),
            origins=(Origin.EDGE_ROUTED, Origin.CLOUD_GENERATED, *_FALLBACK),
        ),
        ModeSpec(
            name="route-token", summary="the edge generates; low-confidence positions get the cloud's token",
            needs_cloud=True, build=_build_routing("route-token"), stats_type=RoutingStats, options_field="routing",
            options_type=RoutingOptions, threshold_field="threshold", default_threshold=0.6,
            threshold_help="the edge's top-token probability; below it the cloud supplies the token",
            knobs=("--router", "--threshold", "--cloud-fraction"),
            origins=(Origin.EDGE_ROUTED, Origin.EDGE_ACCEPTED, Origin.CLOUD_CORRECTED, Origin.CLOUD_GENERATED,
                     *_FALLBACK),
        ),
        ModeSpec(
            name="split", summary="the device runs the first layers and sends hidden states, never tokens",
            needs_cloud=True, build=_build_split, stats_type=SplitStats, options_field="split",
            options_type=SplitOptions, threshold_field="exit_threshold", default_threshold=None,
            threshold_help="early-exit confidence in (0, 1], or off",
            knobs=("--split-layer", "--compression", "--exit-threshold", "--threshold"),
            origins=(Origin.CLOUD_GENERATED, Origin.EDGE_EXIT, *_FALLBACK),
        ),
        ModeSpec(name="edge", summary="the device model alone", needs_cloud=False, build=_build_edge,
                 origins=(Origin.EDGE_ONLY,)),
        ModeSpec(name="cloud", summary="the cloud model generates", needs_cloud=True, build=_build_cloud,
                 origins=(Origin.CLOUD_GENERATED, *_FALLBACK)),
    )
}

#: Mode names, in the registry's order.
MODES: tuple[str, ...] = tuple(MODE_REGISTRY)


def get_mode(name: str) -> ModeSpec:
    """The registry entry of mode `name`.

    Raises:
        ConfigurationError: no such mode (the message lists the modes).
    """
    spec = MODE_REGISTRY.get(name)
    if spec is None:
        raise ConfigurationError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return spec

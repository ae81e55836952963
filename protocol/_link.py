"""Link emulation: one-way delay, jitter and a bandwidth limit, for tests and benchmarks.

What belongs here: the arithmetic of when a message would arrive over a slower link
(sans-I/O: it computes times, the adapter sleeps). "up" is always client -> server and
"down" server -> client, whichever side applies the emulator; apply it on one side only.
Order is preserved (a websocket runs over TCP), so jitter never reorders messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tether.protocol._errors import UsageError

__all__ = ["LinkEmulator", "LinkProfile", "Shaper"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """One direction of a link.

    Attributes:
        delay: one-way propagation delay in seconds.
        jitter: extra delay drawn uniformly from [0, jitter] seconds per message.
        bandwidth: bits per second (None: unlimited); a message occupies the link for
            len * 8 / bandwidth seconds and waits for the messages ahead of it.
    """

    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0 or (self.bandwidth is not None and self.bandwidth <= 0):
            raise UsageError("LinkProfile needs delay >= 0, jitter >= 0 and bandwidth > 0")

    @property
    def is_identity(self) -> bool:
        return self.delay == 0 and self.jitter == 0 and self.bandwidth is None


class Shaper:
    """Arrival times for messages entering one direction of an emulated link, in order."""

    __slots__ = ("_last_arrival", "_link_free_at", "_rng", "profile")

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile = profile
        self._rng = rng
        self._link_free_at = 0.0
        self._last_arrival = 0.0

    def schedule(self, nbytes: int, now: float) -> float:
        """When a message of `nbytes` sent at `now` arrives at the far end."""
        profile = self.profile
        start = max(now, self._link_free_at)
        transmit = nbytes * 8.0 / profile.bandwidth if profile.bandwidth else 0.0
        self._link_free_at = start + transmit
        arrival = self._link_free_at + profile.delay
        if profile.jitter:
            arrival += self._rng.uniform(0.0, profile.jitter)
        arrival = max(arrival, self._last_arrival)
        self._last_arrival = arrival
        return arrival


class LinkEmulator:
    """Emulated link conditions for `connect(..., link=...)` or `serve(..., link=...)`.

    Example:
        LinkEmulator.symmetric(delay=0.040, jitter=0.005, bandwidth=20e6)   # 40 ms, 20 Mbit/s
        LinkEmulator(up=LinkProfile(delay=0.05, bandwidth=5e6), down=LinkProfile(delay=0.05))
    """

    def __init__(self, up: LinkProfile | None = None, down: LinkProfile | None = None, *, seed: int | None = None) -> None:
        self.up = up or LinkProfile()
        self.down = down or LinkProfile()
        self._rng = random.Random(seed)

    @classmethod
    def symmetric(
        cls, *, delay: float = 0.0, jitter: float = 0.0, bandwidth: float | None = None, seed: int | None = None
    ) -> LinkEmulator:
        profile = LinkProfile(delay=delay, jitter=jitter, bandwidth=bandwidth)
        return cls(profile, profile, seed=seed)

    def shapers(self, *, client_side: bool) -> tuple[Shaper | None, Shaper | None]:
        """(outgoing, incoming) shapers for one connection on the given side (None: no shaping)."""
        up = None if self.up.is_identity else Shaper(self.up, random.Random(self._rng.random()))
        down = None if self.down.is_identity else Shaper(self.down, random.Random(self._rng.random()))
        return (up, down) if client_side else (down, up)

    def __repr__(self) -> str:
        return f"LinkEmulator(up={self.up}, down={self.down})"

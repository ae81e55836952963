"""Replay protection for IK first messages: TAI64N timestamps and the server's table of them.

What belongs here: WireGuard's answer to a replayed handshake initiation (its paper, §5.1):
the initiator puts a TAI64N timestamp in the encrypted payload of its first message, and the
responder keeps the greatest timestamp per client static key and refuses one that is not
newer. No I/O: the clock is passed in, and the table is plain data.

TAI64N (https://cr.yp.to/libtai/tai64.html) is 12 bytes, big-endian: u64 2^62 + seconds,
then u32 nanoseconds. Like WireGuard we round the nanoseconds down to a multiple of 2^24
(about 16.8 ms) so the timestamp does not reveal the client's clock finely, and then make
timestamps of this process strictly increasing, so that connections opened within the same
16.8 ms still carry distinct, ordered timestamps.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from tether.protocol._errors import HandshakeError, HandshakeReplayed, UsageError
from tether.protocol._keys import PublicKey

__all__ = ["TAI64N", "TIMESTAMP_LEN", "ReplayGuard", "next_timestamp", "tai64n"]

TAI64N = struct.Struct(">QI")
TIMESTAMP_LEN = TAI64N.size  # 12
_TAI_BASE = 2**62 + 10  # TAI was 10 s ahead of UTC at 1970 (WireGuard's constant)
_WHITEOUT_NS = 1 << 24
_NS = 1_000_000_000


def tai64n(unix_ns: int) -> bytes:
    """The TAI64N label of a Unix time in nanoseconds (nanoseconds kept as given)."""
    seconds, nanos = divmod(unix_ns, _NS)
    return TAI64N.pack(_TAI_BASE + seconds, nanos)


def _as_int(timestamp: bytes) -> int:
    seconds, nanos = TAI64N.unpack(timestamp)
    return seconds * _NS + nanos


_lock = threading.Lock()
_last_ns = 0


def next_timestamp(wall_clock_ns: Callable[[], int] = time.time_ns) -> bytes:
    """A timestamp for the next IK first message from this process: the wall clock rounded
    down to 2^24 ns, or 1 ns past the last one issued if that is later (strictly increasing)."""
    global _last_ns
    now = wall_clock_ns()
    with _lock:
        _last_ns = max(now - now % _WHITEOUT_NS, _last_ns + 1)
        return tai64n(_last_ns)


class ReplayGuard:
    """The greatest IK timestamp accepted per client static key, in a bounded LRU table.

    Args:
        capacity: most client keys remembered. The server records keys only after it has
            authenticated the message and only for keys its allowlist admits, so with an
            allowlist the table never holds more keys than the allowlist (keep `capacity`
            at least that large). Without an allowlist the least recently seen keys are
            forgotten beyond `capacity`; a forgotten key's old message would get an answer
            again, but never a connection: admission waits for the client's first transport
            record, which only the holder of the ephemeral key can produce.
    """

    __slots__ = ("_seen", "capacity")

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise UsageError(f"ReplayGuard capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, client: PublicKey, timestamp: bytes) -> None:
        """Accept `timestamp` for `client` if it is newer than every one seen, and remember it.

        Raises:
            HandshakeError: the payload is not a 12-byte TAI64N timestamp.
            HandshakeReplayed: the timestamp is not newer than the greatest seen for this key.
        """
        if len(timestamp) != TIMESTAMP_LEN:
            raise HandshakeError(f"IK message 1 must carry a {TIMESTAMP_LEN}-byte timestamp, got {len(timestamp)} bytes")
        value = _as_int(timestamp)
        key = client.raw
        last = self._seen.get(key)
        if last is not None and value <= last:
            raise HandshakeReplayed(
                f"IK message 1 from client {client.fingerprint} replayed: its timestamp is not newer "
                "than the last one accepted"
            )
        self._seen[key] = value
        self._seen.move_to_end(key)
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

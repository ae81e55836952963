"""A TCP proxy on loopback that injects link faults between a real client and a real server.

Why a proxy: this machine's kernel has no `netem` qdisc (``tc qdisc add dev lo root netem``
fails with "Specified qdisc kind is unknown", even as root in a fresh network namespace), so
faults are injected in user space, on real sockets, below the websocket and TLS layers.

Faults, per direction and per chunk of bytes read:
- delay and jitter: each chunk is released `delay + U(0, jitter)` seconds after it was read
  (order kept, as TCP keeps it);
- loss: with probability `loss` a chunk is held back one retransmission timeout (`rto`)
  more, which is what a lost segment costs a TCP stream (the bytes are late, never gone);
- stall: nothing is forwarded until `resume()` (or for `seconds`); bytes queue up;
- blackhole: nothing is forwarded ever again and no FIN or RST is sent either way: a
  half-open link, as when a device drops off the network;
- reset: every connection is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class FaultProxy:
    def __init__(self, target_port: int, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0,
                 rto: float = 0.2, seed: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.rto = rto
        self._rng = random.Random(seed)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._blackholed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.chunks_delayed_by_loss = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self, seconds: float | None = None) -> None:
        """Stop forwarding (both ways) until `resume()`, or for `seconds`."""
        self._flowing.clear()
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, self.resume)

    def resume(self) -> None:
        if not self._blackholed:
            self._flowing.set()

    def blackhole(self) -> None:
        """Forward nothing, ever, and close nothing: both ends see a silent, open link."""
        self._blackholed = True
        self._flowing.clear()

    def reset(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            for coro in (self._read(src, queue), self._write(dst, queue)):
                task = asyncio.get_running_loop().create_task(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _read(self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        try:
            while data := await src.read(65536):
                at = loop.time() + self.delay + self._rng.uniform(0.0, self.jitter)
                if self.loss and self._rng.random() < self.loss:
                    at += self.rto
                    self.chunks_delayed_by_loss += 1
                last = max(last, at)  # a byte stream stays in order
                queue.put_nowait((last, data))
        except (ConnectionError, OSError):
            pass
        if not self._blackholed:
            queue.put_nowait(None)

    async def _write(self, dst: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                at, data = item
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
            dst.close()
        except (ConnectionError, OSError):
            pass

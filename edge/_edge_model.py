"""The edge model as the SDK holds it: a runtime, its tokenizer, and one compute thread.

What belongs here: loading (by registry name or from objects) and running blocking model
calls off the event loop. What does not: any decoding policy.

Every call into the runtime goes through `EdgeModel.run`, on one dedicated thread: KV
states are not thread-safe, and one thread with its own torch thread budget is what lets
edge drafting overlap a cloud verify in flight without oversubscribing the CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tether.runtime import CausalLM

if TYPE_CHECKING:
    from tether.edge._text import Tokenizer

T = TypeVar("T")


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


class EdgeModel:
    """A `CausalLM` with its tokenizer and a single compute thread.

    Args:
        runtime: the edge model.
        tokenizer: its tokenizer (shared vocabulary with the cloud model).
        threads: torch intra-op threads for the edge's compute thread (None: leave the
            process default).
    """

    def __init__(self, runtime: CausalLM, tokenizer: Tokenizer, *, threads: int | None = None) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tether-edge", initializer=_set_threads, initargs=(threads,)
        )

    @classmethod
    def load(
        cls, name: str | None = None, *, backend: str = "torch", threads: int | None = None, progress: bool = True
    ) -> EdgeModel:
        """Load a registry model or HF directory (default: the default edge model).

        Args:
            name: registry name or path; None for `tether.models.DEFAULT_EDGE_MODEL`.
            backend: a `load_runtime` backend (``"torch"``, ``"onnx-int4"``, ...).
            threads: compute threads for the edge (torch threads of its compute thread,
                or onnxruntime intra-op threads).
            progress: show progress bars while weights are prepared.

        Raises:
            tether.errors.ModelNotInstalledError: its weight packages are not installed.
        """
        from tether.runtime import load_runtime

        if name is None:
            from tether.models import DEFAULT_EDGE_MODEL

            name = DEFAULT_EDGE_MODEL
        if backend.startswith("onnx"):
            runtime, tokenizer = load_runtime(name, backend=backend, intra_op_num_threads=threads, progress=progress)
        else:
            runtime, tokenizer = load_runtime(name, backend=backend, progress=progress)
        return cls(runtime, tokenizer, threads=threads)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.runtime.info.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int) and tok_eos not in ids:
            ids.append(tok_eos)
        return tuple(ids)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call on the edge thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue a blocking call on the edge thread; returns its future."""
        return self._pool.submit(functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop the compute thread (after queued calls finish)."""
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"EdgeModel({self.runtime.info.name!r}, threads={self.threads})"

"""The device's half of a split model: the embeddings, the first layers and the head of the cloud's model.

What belongs here: `SplitModel` (a `LayerwiseLM` holding layers [0, n) of an L-layer model,
with its own compute thread) and `SplitModelSource` (where a client's split model comes
from: given, or shared with an in-process cloud). What does not: the split decoding loop
(`_split.py`).

Split mode runs the *cloud's* model, not the edge's draft model: both halves must hold the
same weights. `SplitModel.load(name, layers=k)` reads only the tensors of the first k
layers (plus embeddings, final norm and LM head, used for early exit), so a device can hold
a prefix of a model it could not hold whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from tether.errors import ConfigurationError
from tether.runtime import LayerwiseLM

log = logging.getLogger("tether.edge.split")

T = TypeVar("T")

__all__ = ["SplitModel", "SplitModelSource"]


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


class SplitModel:
    """Layers [0, n) of an L-layer model on this device, run on one compute thread.

    Args:
        runtime: a `LayerwiseLM` of the model, whole (n = L) or truncated to its first n
            layers (see `load`).
        num_layers: L, the layer count of the whole model (default: the runtime's own,
            i.e. the runtime is not truncated).
        name: the model's name (compared with the cloud's; default the runtime's).
        threads: torch threads of the compute thread (None: the process default).

    Raises:
        ConfigurationError: the runtime cannot run layer ranges, or holds more layers than L.
    """

    def __init__(
        self, runtime: LayerwiseLM, *, num_layers: int | None = None, name: str | None = None,
        threads: int | None = None,
    ) -> None:
        if not isinstance(runtime, LayerwiseLM):
            raise ConfigurationError(
                f"split mode needs a runtime that can run layer ranges (torch), not {type(runtime).__name__}"
            )
        held = runtime.info.num_layers
        total = held if num_layers is None else int(num_layers)
        if not 0 < held <= total:
            raise ConfigurationError(f"a split model holds 1..{total} layers, this runtime has {held}")
        self.runtime = runtime
        self.num_layers = total
        self.name = name or runtime.info.name
        self.threads = threads
        # Partition profiles measured per cloud connector (see _split.py); weak, so a closed
        # connector's measurements go with it and are never mistaken for a new one's.
        self.profiles: weakref.WeakKeyDictionary[Any, dict[str | None, Any]] = weakref.WeakKeyDictionary()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tether-split", initializer=_set_threads, initargs=(threads,)
        )

    @property
    def layers_held(self) -> int:
        """How many leading layers this device can run (the largest usable split layer)."""
        return self.runtime.info.num_layers

    @property
    def hidden_size(self) -> int:
        return self.runtime.info.hidden_size

    def __repr__(self) -> str:
        return f"SplitModel({self.name!r}, layers {self.layers_held} of {self.num_layers})"

    @classmethod
    def load(
        cls, name: str | None = None, *, layers: int | None = None, threads: int | None = None,
        progress: bool = True,
    ) -> SplitModel:
        """Load the first `layers` layers of a registry model or HF directory (default: the cloud model).

        Only those layers' weights are read (plus embeddings, final norm and LM head), so
        the memory is about ``layers / L`` of the model's layers plus the two vocabulary
        matrices. ``layers=None`` loads every layer (needed to choose k up to L - 1).

        Raises:
            ConfigurationError: `layers` is not in [1, L].
            tether.errors.ModelNotInstalledError, ModelError: as for `tether.models.load_hf`.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from tether.errors import ModelError
        from tether.models import DEFAULT_CLOUD_MODEL, ensure_hf_dir
        from tether.runtime import TorchCausalLM

        name = name or DEFAULT_CLOUD_MODEL
        directory = ensure_hf_dir(name, progress=progress)
        config = AutoConfig.from_pretrained(directory)
        total = int(config.num_hidden_layers)
        keep = total if layers is None else int(layers)
        if not 0 < keep <= total:
            raise ConfigurationError(f"{name} has {total} layers; a split model holds 1..{total}, not {layers}")
        config.num_hidden_layers = keep
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:keep]
        try:
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # unread layers: "unexpected keys"
            try:
                hf = AutoModelForCausalLM.from_pretrained(
                    directory, config=config, dtype=torch.float32, attn_implementation="sdpa"
                )
            finally:
                hf_logging.set_verbosity(verbosity)
        except Exception as exc:
            raise ModelError(f"could not load the first {keep} layers of {name}: {exc}") from exc
        hf.train(False)
        return cls(TorchCausalLM(hf, name=str(name)), num_layers=total, name=str(name), threads=threads)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call on the split model's thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop the compute thread (after queued calls finish)."""
        self._pool.shutdown(wait=True)


class SplitModelSource:
    """Where a client's split model comes from: the one given, or the in-process cloud's own model.

    With ``EdgeClient.local()`` the cloud's model already lives in this process, so split
    mode shares its weights (no second copy) and runs the device's half on a thread of its
    own. A remote cloud needs a `SplitModel` given to the client.
    """

    def __init__(self, model: SplitModel | None, cloud: Any) -> None:
        self._given = model
        self._cloud = cloud
        self._shared: SplitModel | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> SplitModel:
        """The split model.

        Raises:
            ConfigurationError: none was given and the cloud is not in this process.
        """
        if self._given is not None:
            return self._given
        async with self._lock:
            if self._shared is None:
                runtime = await _in_process_runtime(self._cloud)
                if runtime is None:
                    raise ConfigurationError(
                        "split mode over a remote cloud needs the device's half of the model: "
                        "EdgeClient(..., split_model=SplitModel.load(cloud_model_name, layers=k))"
                    )
                self._shared = SplitModel(runtime)
                log.info("split mode shares the in-process cloud model %s", self._shared.name)
            return self._shared

    def close(self) -> None:
        """Stop the thread of a split model this source made (a given one stays open)."""
        if self._shared is not None:
            self._shared.close()
            self._shared = None


async def _in_process_runtime(cloud: Any) -> LayerwiseLM | None:
    """The cloud's runtime when the cloud runs in this process (through link emulation or lazily)."""
    from tether.edge._connectors import InProcessCloud, LazyCloud
    from tether.edge._link import EmulatedLink

    seen = 0
    while seen < 8:  # unwrap emulation and lazy construction
        seen += 1
        if isinstance(cloud, EmulatedLink):
            cloud = cloud.inner
        elif isinstance(cloud, LazyCloud):
            cloud = await cloud.get()
        else:
            break
    if isinstance(cloud, InProcessCloud):
        model = getattr(cloud.manager, "model", None)
        return model if isinstance(model, LayerwiseLM) else None
    return None

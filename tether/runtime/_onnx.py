"""The onnxruntime backend: a `CausalLM` over an ONNX decoder with explicit KV-cache I/O.

What belongs here: driving one `onnxruntime.InferenceSession` step by step and keeping
each sequence's cache as numpy buffers. What does not: building the graph (that is
`_onnx_build.py`), sampling, or anything a mode decides.

Two cache layouts, picked from the graph:

- ``shared`` (graphs whose attention is ORT's ``GroupQueryAttention``, which is what the
  onnxruntime-genai builder emits for CPU): each state owns one preallocated buffer per
  layer, ``[1, kv_heads, capacity, head_dim]``, bound through IO binding as both the
  ``past_key_values.N.*`` input and the ``present.N.*`` output, so the kernel writes the
  new positions in place. A decode step copies no cache; `truncate` only moves the
  length (positions past it are masked out by ``attention_mask`` and overwritten later);
  capacity doubles when needed.
- ``concat`` (any other decoder with past/present I/O): the graph's ``present`` outputs,
  ``[1, kv_heads, length, head_dim]``, become the next call's ``past`` inputs; `truncate`
  slices them. Arrays are never written in place, so a fork shares them until either
  side extends.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch

from tether.errors import ConfigurationError, ModelError, RuntimeStateError
from tether.runtime._base import CausalLM, KVState, ModelInfo
from tether.runtime._onnx_build import HF_CONFIG, HF_GENERATION_CONFIG, build_onnx

KVMode = Literal["shared", "concat"]

_PAST_RE: Final = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TO_NUMPY: Final = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# First allocation of a shared-layout state (positions); doubles on demand.
_MIN_CAPACITY: Final = 256


class OnnxKVState(KVState):
    """One sequence's cache for an `OnnxCausalLM`; create it with `OnnxCausalLM.new_state()`.

    ``shared`` layout: ``buffer`` is [2 * num_layers, 1, kv_heads, capacity, head_dim]
    (past inputs in graph order) and ``ortvalues`` wrap its slices for IO binding.
    ``concat`` layout: ``arrays`` holds the latest present arrays, [1, kv_heads, length, head_dim].
    """

    __slots__ = ("_owner", "_length", "_released", "buffer", "ortvalues", "arrays")

    def __init__(self, owner: OnnxCausalLM) -> None:
        self._owner = owner
        self._length = 0
        self._released = False
        self.buffer: np.ndarray | None = None
        self.ortvalues: list[Any] = []
        self.arrays: list[np.ndarray] | None = None

    @property
    def length(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        """Positions the shared buffer holds before it must grow (0 before the first extend)."""
        return 0 if self.buffer is None else int(self.buffer.shape[3])

    def __repr__(self) -> str:
        status = "released" if self._released else f"length={self._length}"
        return f"<OnnxKVState {status} of {self._owner.info.name!r}>"


class OnnxCausalLM(CausalLM):
    """A `CausalLM` running an ONNX decoder (from `build_onnx`) with onnxruntime on the CPU.

    Args:
        build_dir: a directory holding ``model.onnx`` and the source ``hf_config.json``
            (what `build_onnx` produces).
        name: reported in `info.name`; defaults to the build directory's name.
        intra_op_num_threads: threads for one operator; defaults to ``os.cpu_count()``.
        max_positions: the most positions one sequence may hold; defaults to (and may
            not exceed) the config's ``max_position_embeddings``.
        kv_mode: ``"shared"`` or ``"concat"`` (see the module docstring); defaults to
            ``"shared"`` when the graph uses GroupQueryAttention, else ``"concat"``.
        allow_spinning: let onnxruntime's worker threads busy-wait between operators.
            Off by default: the edge model shares its CPU (with the app, the protocol
            client, in demos and benchmarks with the cloud model), and spinning threads
            then take cores from everyone; measured here on 2 busy cores, int4 decode
            ran at a median 63 tok/s without spinning against 44 with it. On an idle
            machine spinning gains ~10%.

    Raises:
        ConfigurationError: the directory is not a build, or its graph does not have the
            expected inputs and outputs.
        ModelError: onnxruntime could not load the graph.
    """

    def __init__(
        self,
        build_dir: str | os.PathLike[str],
        *,
        name: str | None = None,
        intra_op_num_threads: int | None = None,
        max_positions: int | None = None,
        kv_mode: KVMode | None = None,
        allow_spinning: bool = False,
    ) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        build_dir = Path(build_dir)
        model_path = build_dir / "model.onnx"
        if not model_path.is_file() or not (build_dir / HF_CONFIG).is_file():
            raise ConfigurationError(
                f"{build_dir} is not an ONNX build (needs model.onnx and {HF_CONFIG}); "
                "create one with tether.runtime.build_onnx()"
            )
        config = json.loads((build_dir / HF_CONFIG).read_text())
        generation = (
            json.loads((build_dir / HF_GENERATION_CONFIG).read_text())
            if (build_dir / HF_GENERATION_CONFIG).is_file() else {}
        )

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(intra_op_num_threads or os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        try:
            self._session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelError(f"onnxruntime could not load {model_path}: {exc}") from exc
        self.build_dir = build_dir
        self.intra_op_num_threads = options.intra_op_num_threads

        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        past = sorted(
            (m for m in (_PAST_RE.match(n) for n in inputs) if m),
            key=lambda m: (int(m.group(1)), m.group(2)),
        )
        if "input_ids" not in inputs or "logits" not in outputs or not past:
            raise ConfigurationError(
                f"{model_path} is not a decoder with KV-cache I/O: inputs {sorted(inputs)}, "
                f"outputs {outputs}"
            )
        self._past_names = [m.group(0) for m in past]
        self._present_names = [f"present.{m.group(1)}.{m.group(2)}" for m in past]
        missing = [n for n in self._present_names if n not in outputs]
        if missing:
            raise ConfigurationError(f"{model_path} lacks outputs {missing}")
        self._output_names = ["logits", *self._present_names]
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        first = inputs[self._past_names[0]]
        if first.type not in _ORT_TO_NUMPY:
            raise ConfigurationError(f"{model_path}: unsupported KV-cache type {first.type}")
        self._kv_dtype = _ORT_TO_NUMPY[first.type]
        num_kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        self._kv_shape = (num_kv_heads, head_dim)
        for declared in (first.shape[1], first.shape[3]):
            if isinstance(declared, int) and declared not in self._kv_shape:
                raise ConfigurationError(f"{model_path}: KV shape {first.shape} disagrees with the config")

        if kv_mode is None:
            kv_mode = "shared" if _uses_group_query_attention(model_path) else "concat"
        if kv_mode not in ("shared", "concat"):
            raise ConfigurationError(f"kv_mode must be 'shared' or 'concat', got {kv_mode!r}")
        if kv_mode == "shared" and not self._has_mask:
            raise ConfigurationError("kv_mode='shared' needs a graph with an attention_mask input")
        self.kv_mode: KVMode = kv_mode
        self._ortvalue = ort.OrtValue

        limit = int(config["max_position_embeddings"])
        if max_positions is None:
            max_positions = limit
        if not 0 < max_positions <= limit:
            raise ConfigurationError(f"max_positions must be in [1, {limit}] for this model, got {max_positions}")
        raw_eos = generation.get("eos_token_id", config.get("eos_token_id"))
        eos = [] if raw_eos is None else [raw_eos] if isinstance(raw_eos, int) else list(raw_eos)
        self.info = ModelInfo(
            name=name or build_dir.name,
            vocab_size=int(config["vocab_size"]),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos)),
            max_positions=max_positions,
        )
        if len(self._past_names) != 2 * self.info.num_layers:
            raise ConfigurationError(
                f"{model_path} has {len(self._past_names)} past inputs for {self.info.num_layers} layers"
            )

    @classmethod
    def from_hf_dir(
        cls,
        hf_dir: str | os.PathLike[str],
        precision: str = "int4",
        *,
        progress: bool = True,
        name: str | None = None,
        intra_op_num_threads: int | None = None,
        max_positions: int | None = None,
        kv_mode: KVMode | None = None,
        allow_spinning: bool = False,
    ) -> OnnxCausalLM:
        """Build (once, cached) the ONNX decoder of an HF model directory and load it.

        Arguments after `precision` as for `build_onnx` and the constructor; raises their errors.
        """
        build_dir = build_onnx(hf_dir, precision, progress=progress)
        return cls(build_dir, name=name or f"{Path(hf_dir).name}-onnx-{precision}",
                   intra_op_num_threads=intra_op_num_threads, max_positions=max_positions,
                   kv_mode=kv_mode, allow_spinning=allow_spinning)

    def __repr__(self) -> str:
        return (f"OnnxCausalLM({self.info.name!r}, kv_mode={self.kv_mode!r}, "
                f"threads={self.intra_op_num_threads})")

    # ------------------------------------------------------------------ state handling

    def new_state(self) -> OnnxKVState:
        return OnnxKVState(self)

    def _own(self, state: KVState) -> OnnxKVState:
        if not isinstance(state, OnnxKVState) or state._owner is not self:
            raise RuntimeStateError(f"{state!r} does not belong to {self!r}")
        if state._released:
            raise RuntimeStateError(f"{state!r} was released; create a new state")
        return state

    def truncate(self, state: KVState, length: int) -> None:
        own = self._own(state)
        if not 0 <= length <= own._length:
            raise RuntimeStateError(f"cannot truncate a state of length {own._length} to {length}")
        if own.arrays is not None and length < own._length:
            own.arrays = [a[:, :, :length] for a in own.arrays]  # views; copied when next fed
        own._length = length

    def fork(self, state: KVState) -> OnnxKVState:
        own = self._own(state)
        copy = OnnxKVState(self)
        copy._length = own._length
        if own.buffer is not None:
            self._attach_buffer(copy, own.buffer.copy())
        copy.arrays = None if own.arrays is None else list(own.arrays)  # never written in place
        return copy

    def release(self, state: KVState) -> None:
        own = self._own(state)
        own._released = True
        own.buffer, own.ortvalues, own.arrays = None, [], None

    def _attach_buffer(self, state: OnnxKVState, buffer: np.ndarray) -> None:
        state.buffer = buffer
        state.ortvalues = [self._ortvalue.ortvalue_from_numpy(buffer[i]) for i in range(buffer.shape[0])]

    def _reserve(self, state: OnnxKVState, needed: int) -> None:
        """Make the shared buffer hold at least `needed` positions, keeping the valid ones."""
        if state.capacity >= needed:
            return
        capacity = max(_MIN_CAPACITY, state.capacity)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.info.max_positions)
        heads, head_dim = self._kv_shape
        buffer = np.zeros((len(self._past_names), 1, heads, capacity, head_dim), dtype=self._kv_dtype)
        if state.buffer is not None and state._length:
            buffer[:, :, :, : state._length] = state.buffer[:, :, :, : state._length]
        self._attach_buffer(state, buffer)

    # ------------------------------------------------------------------ forward passes

    def extend(self, state: KVState, token_ids: Sequence[int]) -> torch.Tensor:
        own = self._own(state)
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)  # [1, n]
        n = ids.shape[1]
        if n == 0:
            return torch.empty((0, self.info.vocab_size), dtype=torch.float32)
        if int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size:
            raise ConfigurationError(
                f"token ids must be in [0, {self.info.vocab_size}), got min {int(ids.min())} max {int(ids.max())}"
            )
        past = own._length
        total = past + n
        if total > self.info.max_positions:
            raise RuntimeStateError(
                f"{self.info.name}: {past} cached + {n} new positions exceed max_positions "
                f"{self.info.max_positions}"
            )
        try:
            if self.kv_mode == "shared":
                logits = self._extend_shared(own, ids, past, total)
            else:
                logits = self._extend_concat(own, ids, past, total)
        except (ConfigurationError, RuntimeStateError):
            raise
        except Exception as exc:  # onnxruntime's pybind errors carry no common base we can name
            raise ModelError(f"onnxruntime failed on {self.info.name}: {exc}") from exc
        own._length = total
        # logits: [n, vocab] float32, sharing memory with the array onnxruntime wrote into.
        return torch.from_numpy(logits)

    def _common_feeds(self, ids: np.ndarray, past: int, total: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids}
        if self._has_mask:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if self._has_positions:
            feeds["position_ids"] = np.arange(past, total, dtype=np.int64).reshape(1, -1)
        return feeds

    def _extend_shared(self, state: OnnxKVState, ids: np.ndarray, past: int, total: int) -> np.ndarray:
        self._reserve(state, total)
        binding = self._session.io_binding()
        for name, value in self._common_feeds(ids, past, total).items():
            binding.bind_cpu_input(name, value)
        for past_name, present_name, value in zip(
            self._past_names, self._present_names, state.ortvalues, strict=True
        ):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)  # same memory: written in place
        logits = np.empty((1, ids.shape[1], self.info.vocab_size), dtype=np.float32)
        binding.bind_ortvalue_output("logits", self._ortvalue.ortvalue_from_numpy(logits))
        self._session.run_with_iobinding(binding)
        row: np.ndarray = logits[0]
        return row

    def _extend_concat(self, state: OnnxKVState, ids: np.ndarray, past: int, total: int) -> np.ndarray:
        feeds: dict[str, Any] = self._common_feeds(ids, past, total)
        if state.arrays is None:
            heads, head_dim = self._kv_shape
            empty = np.zeros((1, heads, 0, head_dim), dtype=self._kv_dtype)
            state.arrays = [empty] * len(self._past_names)
        for name, array in zip(self._past_names, state.arrays, strict=True):
            feeds[name] = np.ascontiguousarray(array)
        results = self._session.run(self._output_names, feeds)
        state.arrays = results[1:]
        logits: np.ndarray = results[0][0]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits


def _uses_group_query_attention(model_path: Path) -> bool:
    """Whether the graph's attention is com.microsoft GroupQueryAttention (weights not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type == "GroupQueryAttention" for node in model.graph.node)

"""The shared model runtime: prefill, extend, roll back and fork KV caches, run layer ranges,
and the one batched greedy decoder."""

from tether.runtime._base import CausalLM, KVState, LayerwiseLM, ModelInfo
from tether.runtime._decode import Decoded, forward_with_hidden, greedy_decode, greedy_generate
from tether.runtime._kvcache import TorchKVState
from tether.runtime._loader import RUNTIME_BACKENDS, load_runtime
from tether.runtime._onnx import OnnxCausalLM, OnnxKVState
from tether.runtime._onnx_build import ONNX_PRECISIONS, build_onnx
from tether.runtime._torch import TorchCausalLM

__all__ = ["CausalLM", "KVState", "LayerwiseLM", "ModelInfo", "TorchCausalLM", "TorchKVState",
           "RUNTIME_BACKENDS", "load_runtime", "OnnxCausalLM", "OnnxKVState", "ONNX_PRECISIONS", "build_onnx",
           "Decoded", "forward_with_hidden", "greedy_decode", "greedy_generate"]

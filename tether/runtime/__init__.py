"""The shared model runtime: prefill, extend, roll back and fork KV caches, run layer ranges."""

from tether.runtime._base import CausalLM, KVState, LayerwiseLM, ModelInfo

__all__ = ["CausalLM", "KVState", "LayerwiseLM", "ModelInfo"]

"""The torch backend's per-sequence KV cache: preallocated tensors plus a length per layer.

What belongs here: storage, growth, truncation, forking and the misuse checks on one state.
What does not: any model math (that is `_torch.py`); the cache never runs a layer.

Layout (gpt-fast style): layer i holds K and V as [num_kv_heads, capacity, head_dim];
positions [0, lengths[i]) are valid and the rest is scratch. Lengths are plain Python
ints, so checking and rolling back never touches a tensor or syncs a device.
"""

from __future__ import annotations

import torch

from tether.errors import RuntimeStateError
from tether.runtime._base import KVState

# Smallest allocation for a layer: a short chat turn fits without any regrowth.
_MIN_CAPACITY = 256


class TorchKVState(KVState):
    """One sequence's cache for a `TorchCausalLM`; create it with `TorchCausalLM.new_state()`.

    Each layer's storage is allocated the first time that layer runs, so a state that
    only ever runs layers [k, L) (the cloud half of split computing) holds nothing for
    layers [0, k). Capacity doubles when exceeded (amortised O(1) appends), capped at
    the model's `max_positions`.

    Public: `length`, `released`, `layer_length`. The underscored methods are for
    `TorchCausalLM` only; use the model's `truncate` / `fork` / `release`.
    """

    __slots__ = ("_owner", "_owner_name", "_shape", "_dtype", "_device", "_max_positions",
                 "_keys", "_values", "_lengths", "_released")

    def __init__(
        self,
        *,
        owner: object,
        owner_name: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
    ) -> None:
        self._owner = owner  # identity check only: a state is valid for exactly one model
        self._owner_name = owner_name
        self._shape = (num_kv_heads, head_dim)
        self._dtype = dtype
        self._device = device
        self._max_positions = max_positions
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths: list[int] = [0] * num_layers
        self._released = False

    # -- what callers may read ----------------------------------------------------------

    @property
    def length(self) -> int:
        """Positions held by the most advanced layer; 0 if no layer has run.

        Layers always run in order, so this is the length at the lowest layer that holds
        anything: the full sequence length for a state that runs all layers, and the
        length of layers [k, L) for a cloud-side split state.

        Raises:
            RuntimeStateError: the state was released.
        """
        self._check_live()
        return max(self._lengths)

    @property
    def released(self) -> bool:
        """True once `release` has run; the state can no longer be used."""
        return self._released

    def layer_length(self, layer: int) -> int:
        """Positions held by one layer (0 for a layer this state never ran)."""
        self._check_live()
        return self._lengths[layer]

    def __repr__(self) -> str:
        if self._released:
            return f"<TorchKVState of {self._owner_name!r}, released>"
        return f"<TorchKVState of {self._owner_name!r}, length={max(self._lengths)}>"

    # -- checks -------------------------------------------------------------------------

    def _check_live(self) -> None:
        if self._released:
            raise RuntimeStateError(
                f"this KV state of model {self._owner_name!r} was released; "
                "create a new one with new_state() (or fork() before releasing)"
            )

    def _check_owner(self, owner: object, owner_name: str) -> None:
        """Raise `RuntimeStateError` unless the state is live and was made by `owner`."""
        self._check_live()
        if self._owner is not owner:
            raise RuntimeStateError(
                f"this KV state belongs to model {self._owner_name!r}, not {owner_name!r}; "
                "a state can only be used with the model instance that created it"
            )

    def _start_length(self, start: int, stop: int, n_new: int) -> int:
        """Length shared by layers [start, stop) before appending `n_new` positions.

        Raises:
            RuntimeStateError: the layers hold different lengths (a range was run
                partially), or `n_new` more positions would exceed `max_positions`.
        """
        if start >= stop:
            return 0  # an empty range runs nothing and appends nothing
        past = self._lengths[start]
        for layer in range(start + 1, stop):
            if self._lengths[layer] != past:
                raise RuntimeStateError(
                    f"layers [{start}, {stop}) of this KV state hold different lengths "
                    f"(layer {start}: {past}, layer {layer}: {self._lengths[layer]}); "
                    "run every layer of a range for the same positions, or truncate() first"
                )
        if past + n_new > self._max_positions:
            raise RuntimeStateError(
                f"appending {n_new} positions to {past} would exceed model "
                f"{self._owner_name!r}'s max_positions of {self._max_positions}"
            )
        return past

    # -- storage ------------------------------------------------------------------------

    def _grow(self, layer: int, needed: int) -> None:
        """Make layer `layer` able to hold `needed` positions, keeping what it holds."""
        old_k, old_v = self._keys[layer], self._values[layer]
        old_capacity = 0 if old_k is None else old_k.shape[1]
        if needed <= old_capacity:
            return
        capacity = min(self._max_positions, max(needed, 2 * old_capacity, _MIN_CAPACITY))
        heads, head_dim = self._shape
        new_k = torch.empty(heads, capacity, head_dim, dtype=self._dtype, device=self._device)
        new_v = torch.empty_like(new_k)
        if old_k is not None and old_v is not None:
            held = self._lengths[layer]
            new_k[:, :held].copy_(old_k[:, :held])
            new_v[:, :held].copy_(old_v[:, :held])
        self._keys[layer], self._values[layer] = new_k, new_v

    def _append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values for one layer; return views of everything it now holds.

        Args:
            layer: the layer index.
            keys: [num_kv_heads, n, head_dim], already rotated.
            values: [num_kv_heads, n, head_dim].

        Returns:
            (K, V), each [num_kv_heads, past + n, head_dim], views into the cache (valid
            until the next append to this layer).
        """
        n = keys.shape[1]
        assert keys.shape == values.shape == (self._shape[0], n, self._shape[1]), keys.shape
        past = self._lengths[layer]
        self._grow(layer, past + n)
        k_cache, v_cache = self._keys[layer], self._values[layer]
        assert k_cache is not None and v_cache is not None
        k_cache[:, past : past + n].copy_(keys)
        v_cache[:, past : past + n].copy_(values)
        self._lengths[layer] = past + n
        return k_cache[:, : past + n], v_cache[:, : past + n]

    def _truncate(self, length: int) -> None:
        """Keep only the first `length` positions in every layer; O(1), nothing is freed.

        Raises:
            RuntimeStateError: the state was released, or `length` is negative or more
                than the state holds.
        """
        self._check_live()
        held = max(self._lengths)
        if length < 0:
            raise RuntimeStateError(f"cannot truncate to a negative length ({length})")
        if length > held:
            raise RuntimeStateError(
                f"cannot truncate to {length} positions: this KV state holds only {held}"
            )
        self._lengths = [min(n, length) for n in self._lengths]

    def _fork(self) -> TorchKVState:
        """An independent copy: same capacity, the held positions copied, the rest not."""
        self._check_live()
        heads, head_dim = self._shape
        twin = TorchKVState(
            owner=self._owner,
            owner_name=self._owner_name,
            num_layers=len(self._lengths),
            num_kv_heads=heads,
            head_dim=head_dim,
            dtype=self._dtype,
            device=self._device,
            max_positions=self._max_positions,
        )
        for layer, (k, v) in enumerate(zip(self._keys, self._values, strict=True)):
            if k is None or v is None:
                continue
            held = self._lengths[layer]
            twin._keys[layer] = new_k = torch.empty_like(k)
            twin._values[layer] = new_v = torch.empty_like(v)
            new_k[:, :held].copy_(k[:, :held])
            new_v[:, :held].copy_(v[:, :held])
        twin._lengths = list(self._lengths)
        return twin

    def _release(self) -> None:
        """Drop the tensors; any later use raises `RuntimeStateError`. Idempotent."""
        self._keys = [None] * len(self._keys)
        self._values = [None] * len(self._values)
        self._released = True

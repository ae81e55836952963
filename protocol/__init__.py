"""tether.protocol: the end-to-end encrypted wire protocol (sans-I/O core + websockets adapter)."""

__all__: list[str] = []

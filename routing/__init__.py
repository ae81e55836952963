"""tether.routing: per-query and per-token routers deciding between edge and cloud."""

__all__: list[str] = []

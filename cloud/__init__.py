"""tether.cloud: the service that holds the large model and each edge session's state."""

__all__: list[str] = []

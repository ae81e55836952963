"""tether.edge: the SDK an app imports on the device."""

__all__: list[str] = []

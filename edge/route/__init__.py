"""Routing modes on the device: route-query (whole answers) and route-token (single positions).

The strategies only; routers themselves (data and scoring) live in `tether.routing`.
"""


__all__ = []

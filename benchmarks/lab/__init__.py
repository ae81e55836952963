"""The lab's tooling beside the product (not in the wheel): task banks, code evaluation in a
sandbox, data collection for routers, routing curves and the exit-head training corpus.

Product commands that train from this data (`tether router collect`, `tether split`'s
corpus commands) load it from the source checkout, as `tether bench` does.
"""

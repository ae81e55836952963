"""tether.benchmarks: the benchmarks behind `tether bench`, writing JSON and docs/benchmarks.md."""

__all__: list[str] = []

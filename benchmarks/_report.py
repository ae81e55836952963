"""The shared way benchmarks report: JSON under benchmarks/results/, a section of docs/benchmarks.md.

A benchmark writes its numbers with `write_results(name, data)` to
`benchmarks/results/<name>.json` and its human summary with `update_docs_section(name,
markdown)` into docs/benchmarks.md, where it owns exactly the lines between
`<!-- bench:<name> -->` and `<!-- /bench:<name> -->`: rerunning one benchmark never touches
another's section.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["environment", "repo_root", "update_docs_section", "write_results"]

_DOC_HEADER = """# Benchmarks

Numbers measured by `tether bench <name>`. Each benchmark owns one section of this file,
between `<!-- bench:<name> -->` and `<!-- /bench:<name> -->`, and rewrites only that
section when rerun; its raw results are in `benchmarks/results/<name>.json`. Sections say
which machine and which versions produced them.
"""


def repo_root() -> Path:
    """The source checkout (where docs/ and benchmarks/ live), else the current directory."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists() and (here / "benchmarks").is_dir():
        return here
    return Path.cwd()


def environment() -> dict[str, Any]:
    """Where a result was measured: interpreter, platform, CPUs and key package versions."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("tether", "websockets", "cryptography", "numpy", "torch", "transformers"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "packages": packages,
    }


def write_results(name: str, data: dict[str, Any], *, root: Path | None = None) -> Path:
    """Write `benchmarks/results/<name>.json` (pretty, stable key order); returns the path."""
    path = (root or repo_root()) / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def update_docs_section(name: str, markdown: str, *, path: Path | None = None) -> Path:
    """Replace (or append) this benchmark's marked section of docs/benchmarks.md."""
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"benchmark names are lowercase words, not {name!r}")
    path = path or repo_root() / "docs" / "benchmarks.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else _DOC_HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path

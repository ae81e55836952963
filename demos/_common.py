"""Helpers shared by the demos: the model arguments and printing a stream coloured by origin.

Every demo takes ``--edge-model`` / ``--cloud-model`` (a registry name or a Hugging Face
model directory); left out, the embedded default pair is used.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from rich.console import Console
from rich.text import Text

from tether.cli._chat import legend, printable
from tether.edge import ORIGIN_STYLES, StreamToken

console = Console(highlight=False, soft_wrap=True)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the model options every demo takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--edge-model", help="edge model: registry name or model directory (default: the default pair)")
    p.add_argument("--cloud-model", help="cloud model: registry name or model directory (default: the default pair)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    return p


def show_stream(tokens: Iterable[StreamToken]) -> None:
    """Print tokens as they arrive, each coloured by where it came from."""
    console.print(legend())
    for tok in tokens:
        console.print(Text(printable(tok.text), style=ORIGIN_STYLES[tok.origin]), end="")
    console.print()

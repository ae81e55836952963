"""Running model-written code: a separate, resource-limited, network-less process.

What belongs here: `run_python`, the one place generated code is executed, and its result
type. What does not: building the program (`_codeeval.py`) or deciding what a pass means.

Layers of containment, outermost first (see docs/routing.md, "Executing generated code"):
1. a fresh network namespace (``unshare -n``) when the kernel lets us create one, so the
   program sees only a loopback interface that is down: no network at all;
2. a new process session, killed as a group when the wall-clock timeout passes;
3. ``resource.setrlimit`` in the child before ``exec``: CPU seconds, address space, file
   size, open files, no core dumps;
4. ``python -I`` (isolated: no user site, no ``PYTHON*`` variables), an empty environment
   but ``PATH``, and a private temporary working directory deleted afterwards;
5. a prelude that disables the obvious destructive calls (``os.system``, ``subprocess``,
   ``shutil.rmtree``, ...), as OpenAI's human-eval ``reliability_guard`` does. This is a
   seat belt, not a wall: layers 1-4 are the containment.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp, sys as _sys
for _m, _names in ((_os, ("system", "kill", "killpg", "fork", "forkpty", "putenv", "remove",
                          "removedirs", "rmdir", "unlink", "rename", "renames", "truncate",
                          "chmod", "chown", "setuid", "execv", "execve", "spawnv")),
                   (_sh, ("rmtree", "move", "chown")), (_sp, ("Popen", "run", "call",
                          "check_call", "check_output"))):
    for _n in _names:
        if hasattr(_m, _n):
            setattr(_m, _n, None)
_sys.setrecursionlimit(3000)
del _b, _os, _sh, _sp, _sys, _m, _names, _n
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxResult:
    """What a sandboxed run did.

    Attributes:
        passed: exit status 0 within the time limit.
        returncode: the exit status (negative: killed by that signal); None on timeout.
        timed_out: the wall-clock limit passed and the process group was killed.
        stdout, stderr: the last 2,000 characters of each.
        isolated_network: the run was inside a fresh network namespace.
    """

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    isolated_network: bool


@functools.cache
def network_isolation_available() -> bool:
    """True when ``unshare -n`` can create a network namespace here (root or user namespaces)."""
    try:
        done = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _limit(cpu_s: int, memory_bytes: int, file_bytes: int) -> None:  # runs in the child
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(
    code: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    require_network_isolation: bool = False,
) -> SandboxResult:
    """Run `code` as a Python program in a sandboxed child process.

    Args:
        code: the whole program; it passes when it exits with status 0.
        timeout: wall-clock seconds before the process group is killed (CPU time is capped
            at the same number of seconds, rounded up).
        memory_mb: address-space limit.
        max_file_mb: the largest file it may write (in its private temporary directory).
        require_network_isolation: raise instead of running without a network namespace.

    Returns:
        `SandboxResult`; the temporary directory is gone afterwards.

    Raises:
        RuntimeError: `require_network_isolation` and ``unshare -n`` is not available.
        ValueError: a non-positive limit.
    """
    if timeout <= 0 or memory_mb <= 0 or max_file_mb <= 0:
        raise ValueError(f"limits must be > 0, got timeout={timeout}, memory_mb={memory_mb}, max_file_mb={max_file_mb}")
    isolated = network_isolation_available()
    if require_network_isolation and not isolated:
        raise RuntimeError("no network namespace available (unshare -n failed); refusing to run generated code")
    with tempfile.TemporaryDirectory(prefix="tether-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_PRELUDE)
            fh.write(code)
        cmd = [sys.executable, "-I", path]
        if isolated:
            cmd = ["unshare", "-n", "--", *cmd]
        limits = functools.partial(_limit, int(timeout) + 1, memory_mb << 20, max_file_mb << 20)
        proc = subprocess.Popen(
            cmd, cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=limits, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            timed_out = True
    rc = None if timed_out else proc.returncode
    return SandboxResult(
        passed=not timed_out and rc == 0,
        returncode=rc,
        timed_out=timed_out,
        stdout=out.decode("utf-8", "replace")[-2000:],
        stderr=err.decode("utf-8", "replace")[-2000:],
        isolated_network=isolated,
    )

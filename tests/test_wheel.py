"""The built wheel installs into a fresh virtual environment and every public module imports.

The venv reuses the system site-packages for the heavy dependencies (torch, transformers)
but gets Tether itself only from the wheel, and the test checks that the modules really
come from the venv, so a folder missing from the package mapping fails here.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "tether",
    "tether.cli",
    "tether.runtime",
    "tether.models",
    "tether.edge",
    "tether.cloud",
    "tether.protocol",
    "tether.routing",
    "benchmarks",
]


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("tether-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import importlib, sys\n"
        f"names = {PUBLIC_MODULES!r}\n"
        "for n in names:\n"
        "    m = importlib.import_module(n)\n"
        "    assert sys.prefix in m.__file__, (n, m.__file__)\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok"
    version = subprocess.run(
        [str(env_dir / "bin" / "tether"), "--version"], check=True, capture_output=True, text=True
    )
    assert version.stdout.startswith("tether ")

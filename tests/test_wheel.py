"""The built wheel installs into a fresh virtual environment and every package in it imports.

The child venv gets Tether only from the wheel. Its heavy dependencies (torch, transformers)
come from the environment running the tests, whatever that is: a virtual environment (as
the README's test command runs in a fresh one) or the system interpreter. A venv made with
``system_site_packages=True`` would see only the *base* interpreter's packages, not a
parent venv's, so instead the parent's site-packages directories are listed in a ``.pth``
file of the child: plain path entries, after the child's own site-packages, whose own
``.pth`` files (the parent's editable install of Tether) are not run. The test checks that
every module really comes from the child, so a folder missing from the package mapping
fails here, and that the wheel holds code and declared package data only (no benchmarks,
results, caches or lab tooling).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Whatever else ships is a bug: the lab, its results and caches stay in the checkout.
FORBIDDEN_PARTS = {"benchmarks", "lab", "results", "__pycache__", "tests", "demos"}
MAX_WHEEL_BYTES = 2 * 1024 * 1024  # the code is ~0.4 MiB; data files creeping in show here


def _packages() -> tuple[list[str], dict[str, list[str]]]:
    """The packages and package-data patterns pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    return list(cfg["packages"]), {k: list(v) for k, v in cfg.get("package-data", {}).items()}


def _parent_site_dirs() -> list[str]:
    """The directories the running interpreter loads installed packages from."""
    dirs = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    for key in ("purelib", "platlib"):
        dirs.append(sysconfig.get_paths()[key])
    out: list[str] = []
    for d in dirs:
        if os.path.isdir(d) and d not in out:
            out.append(d)
    return out


def _check_contents(wheel: Path, packages: list[str], package_data: dict[str, list[str]]) -> None:
    """Only modules of the declared packages and their declared data files are in the wheel."""
    pkg_dirs = {"/".join(["tether", *p.split(".")[1:]]): p for p in packages}
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    bad: list[str] = []
    for name in names:
        path = PurePosixPath(name)
        if path.parts[0].endswith(".dist-info"):
            continue
        if FORBIDDEN_PARTS & set(path.parts) or path.suffix == ".pyc":
            bad.append(name)
            continue
        package = pkg_dirs.get(str(path.parent))
        if package is None:
            bad.append(name)
        elif path.suffix != ".py" and not any(fnmatch.fnmatch(path.name, pat) for pat in package_data.get(package, [])):
            bad.append(name)
    assert not bad, f"the wheel ships files that are not code or declared package data: {bad}"


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    packages, package_data = _packages()
    # Build from a clean copy: a stale build/ folder in the checkout (setuptools reuses it)
    # could ship modules deleted since, and the checkout stays untouched.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "results"))
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("tether-*.whl")
    size = wheel.stat().st_size
    record_property("wheel_bytes", size)
    print(f"wheel {wheel.name}: {size / 1024:.0f} KiB")
    assert size < MAX_WHEEL_BYTES, f"the wheel is {size} bytes"
    _check_contents(wheel, packages, package_data)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(child_site) / "_tether_test_parent.pth").write_text("\n".join(_parent_site_dirs()) + "\n")
    # The parent's pip, run by the child interpreter, installs into the child.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import importlib, sys\n"
        f"names = {packages!r}\n"
        "for n in names:\n"
        "    m = importlib.import_module(n)\n"
        "    assert m.__file__.startswith(sys.prefix), (n, m.__file__)\n"
        "import torch, transformers\n"  # the heavy dependencies resolve from the parent
        "try:\n"
        "    import benchmarks\n"
        "except ImportError:\n"
        "    print('ok')\n"
        "else:\n"
        "    print('benchmarks importable from', benchmarks.__file__)\n"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    version = subprocess.run(
        [str(env_dir / "bin" / "tether"), "--version"], check=True, capture_output=True, text=True
    )
    assert version.stdout.startswith("tether ")

"""./cxr, the entry script a new user runs first: it prepares .venv once, and a second run installs nothing.

The preparation runs for real in a clone of the committed HEAD, offline: CXR_REUSE_SITE_PACKAGES points the
clone's new .venv at the site-packages that already holds torch and every dependency (this test's own), so
pip installs only the project, with --no-index. PIP_LOG tells whether pip was called at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UP_TO_DATE_WITHIN_S = 10.0  # a stamp check: ~0.3 s idle, slack for a loaded 2-core machine


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A git clone of the committed HEAD: what a new user gets (uncommitted changes are not in it)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the project")
    target = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, capture_output=True)
    if not (target / "cxr").exists():
        pytest.skip("the committed HEAD has no ./cxr yet (commit it first)")
    return target


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "CXR_TORCH", "CXR_REUSE_SITE_PACKAGES")
    }
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    env.update(extra)
    return env


def _reusable_site_packages() -> Path:
    """The folder that holds this interpreter's torch; the clone's .venv takes pip and setuptools from it too."""
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None, "torch is not importable here"
    folder = Path(spec.origin).resolve().parents[1]
    missing = [name for name in ("pip", "setuptools") if not (folder / name).is_dir()]
    if missing:
        pytest.skip(f"{folder} holds torch but not {missing}: nothing to build the project offline with")
    return folder


def test_help_names_every_verb() -> None:
    result = _run([ROOT / "cxr", "--help"], ROOT, _env())
    assert result.returncode == 0, result.stderr
    for word in ("demo", "test", "prepare", "--fresh"):
        assert word in result.stdout, f"./cxr --help does not mention {word}"


def test_unknown_verb_and_torch_choice_are_errors_before_any_work(clone: Path, tmp_path: Path) -> None:
    result = _run([clone / "cxr", "bogus"], clone, _env())
    assert result.returncode == 1 and "Error: unknown command bogus" in result.stderr
    result = _run([clone / "cxr", "prepare"], clone, _env(CXR_TORCH="gpu"))
    assert result.returncode == 1 and "CXR_TORCH=gpu" in result.stderr
    assert not (clone / ".venv").exists(), "a refused command must not have started building .venv"


@pytest.mark.slow
def test_second_preparation_installs_nothing(clone: Path, tmp_path: Path) -> None:
    pip_log = tmp_path / "pip.log"
    env = _env(CXR_REUSE_SITE_PACKAGES=str(_reusable_site_packages()), PIP_LOG=str(pip_log))
    cxr = clone / "cxr"

    first = _run([cxr, "prepare", "test"], clone, env)
    assert first.returncode == 0, first.stderr
    assert "installing the project" in first.stderr and pip_log.exists(), "the first run must install"
    where = _run(
        [clone / ".venv/bin/python", "-c", "import cxr_embed; print(cxr_embed.__file__)"], clone, env
    )
    assert where.stdout.strip() == str(clone / "cxr_embed" / "__init__.py"), where.stdout + where.stderr

    for profile in ("test", "demo"):  # the test set-up is a superset of the demo's
        pip_log.unlink(missing_ok=True)
        start = time.perf_counter()
        again = _run([cxr, "prepare", profile], clone, env)
        elapsed = time.perf_counter() - start
        assert again.returncode == 0, again.stderr
        assert "up to date" in again.stderr and "installing" not in again.stderr, again.stderr
        assert not pip_log.exists(), f"prepare {profile} called pip although .venv was up to date"
        assert elapsed < UP_TO_DATE_WITHIN_S, f"an up-to-date prepare {profile} took {elapsed:.1f}s"

    # A changed pyproject.toml is new work: the project is installed again (torch is not).
    with (clone / "pyproject.toml").open("a") as handle:
        handle.write("\n# changed\n")
    changed = _run([cxr, "prepare", "test"], clone, env)
    assert changed.returncode == 0, changed.stderr
    assert "installing the project" in changed.stderr and "reusing torch" not in changed.stderr, (
        changed.stderr
    )
    assert pip_log.exists()

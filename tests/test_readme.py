"""The README is the user's manual: its commands must be the ones CI and users actually run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\s*\n+```bash\n(.*?)```", text, re.S | re.M)
    assert match, f"README has no ```bash block under '## {heading}'"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_block_after("Tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"`.ci/run` must run the README's test command verbatim: {command!r}"


def test_help_is_instant_and_lists_every_command() -> None:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "cxr_embed_cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    elapsed = time.perf_counter() - start
    for command in ("index", "encode", "model", "store", "classify", "predict", "search", "sql", "finetune", "synth", "demo"):
        assert re.search(rf"\b{command}\b", out), f"`cxr-embed --help` does not list `{command}`"
    assert elapsed < 5, f"--help took {elapsed:.1f}s: a command module imports something heavy at import time"


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, cxr_embed_cli.main; "
        "heavy = [m for m in ('torch', 'faiss', 'sklearn', 'duckdb', 'pydicom', 'ray') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the CLI pulls in heavy modules: {out}"

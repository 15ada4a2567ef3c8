"""The README is the user's manual: its commands must be the ones CI and users actually run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\s*\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert match, f"README has no ```bash block under '## {heading}'"
    return match.group(1).strip()


def _commands(block: str) -> list[str]:
    """The commands of a ```bash block, comments and blank lines dropped."""
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_exactly_the_readme_first_screen_test_command() -> None:
    """CI takes a new user's path: the first screen's `./cxr test`, which runs the README's test command."""
    first_screen = _commands(_readme_block_after("Quick start"))
    assert first_screen[:2] == ["./cxr demo", "./cxr test"], f"the README's first commands are {first_screen}"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "./cxr test" in ci, (
        "`.ci/run` must run the README's first-screen test command `./cxr test` verbatim"
    )
    test_command = _commands(_readme_block_after("Tests"))[0]
    entry = (ROOT / "cxr").read_text()
    assert f'exec {test_command} "$@"' in entry, (
        f"./cxr test must run the README's test command {test_command!r}"
    )


def _readme_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "docs" / "readme.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.mark.slow
def test_readme_real_output_blocks_are_what_the_commands_print_now() -> None:
    result = _readme_tool("--check")
    assert result.returncode == 0, (
        "README.md is stale; run `python docs/readme.py --update`:\n" + result.stdout + result.stderr
    )
    assert "up to date" in result.stderr


MINI_README = """# mini

<!-- [[[setup: rm -rf d]]] -->
<!-- [[[run: cxr-embed synth d --n 4 --size 64 --seed 0 --layout folder
ls d/normal]]] -->
<!-- [[[end]]] -->

prose the tool never touches
"""


def test_readme_check_fails_when_a_real_output_block_is_edited_by_hand(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(MINI_README)
    assert _readme_tool("--update", "--readme", readme).returncode == 0
    generated = readme.read_text()
    assert "$ cxr-embed synth d --n 4" in generated and "$ ls d/normal" in generated
    assert generated.endswith("<!-- [[[end]]] -->\n\nprose the tool never touches\n")
    assert _readme_tool("--check", "--readme", readme).returncode == 0, "a fresh update must pass the check"

    by_hand = generated.replace("00000001_000.png", "00000001_999.png", 1)
    assert by_hand != generated
    readme.write_text(by_hand)
    result = _readme_tool("--check", "--readme", readme)
    assert result.returncode == 1
    assert "-00000001_999.png" in result.stdout and "+00000001_000.png" in result.stdout, result.stdout
    assert readme.read_text() == by_hand, "--check must not rewrite the README"


def test_readme_tool_refuses_an_unclosed_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- [[[run: echo hi]]] -->\nno end marker\n")
    result = _readme_tool("--check", "--readme", readme)
    assert result.returncode == 1 and "without its <!-- [[[end]]] -->" in result.stderr, result.stderr


def test_help_is_instant_and_lists_every_command() -> None:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "cxr_embed_cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    elapsed = time.perf_counter() - start
    for command in (
        "index",
        "encode",
        "model",
        "store",
        "classify",
        "predict",
        "search",
        "sql",
        "finetune",
        "synth",
        "demo",
    ):
        assert re.search(rf"\b{command}\b", out), f"`cxr-embed --help` does not list `{command}`"
    assert elapsed < 5, f"--help took {elapsed:.1f}s: a command module imports something heavy at import time"


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, cxr_embed_cli.main; "
        "heavy = [m for m in ('torch', 'faiss', 'sklearn', 'duckdb', 'pydicom', 'ray') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing the CLI pulls in heavy modules: {out}"

#!/usr/bin/env python3
"""Keep the README's real-output blocks real: regenerate them by running their commands (cog-style).

Why: output pasted by hand goes stale the day a format changes. Every block marked here is produced by
running its command in a scratch folder, so `--check` (run by CI through tests/test_readme.py) fails the
moment the README and the program disagree, and `--update` rewrites the blocks from a fresh run.

    python docs/readme.py --check            # exit 1 and a unified diff when README.md is stale
    python docs/readme.py --update           # rewrite the marked blocks in place
    python docs/readme.py --check --readme OTHER.md

Marker syntax (HTML comments, invisible on GitHub):

    <!-- [[[run: cxr-embed synth data --n 24 --size 256 --seed 0]]] -->
    ```console
    $ cxr-embed synth data --n 24 --size 256 --seed 0
    ...everything between the markers is generated...
    ```
    <!-- [[[end]]] -->

- Markers stand alone on their lines. `[[[run OPTIONS: COMMAND]]]` runs COMMAND with bash and shows `$ COMMAND` followed by its stdout. Several
  commands, one per line, may stand between `[[[run OPTIONS:` and `]]]`: they run in order and the block shows
  each prompt and its output. OPTIONS (space separated, all optional):
  `stderr` (show stderr too, interleaved as a terminal would), `exit=N` (the exit status the commands are
  expected to end with, default 0: any other is an error of the README, not of the block),
  `head=N` (keep the first N output lines of each command, then a `…` line), `columns=N` (terminal width,
  default 100).
- `[[[setup: COMMAND]]]` (one line, no block, no `[[[end]]]`) runs a command whose output is not shown,
  e.g. to build a store that the blocks below query. Its failure is an error.
- Every command of one README runs in the same scratch folder, top to bottom: a block may use what an
  earlier block or setup made (`cxr-embed synth data …` then `cxr-embed index data …`).

The environment is fixed so the output is deterministic on CPU: the scratch folder is the working
directory and holds a link `cxr` to the entry script (for `./cxr --help`, never a verb that builds
.venv); `cxr-embed` is the one next to this Python (the project's venv); `CXR_EMBED_MODEL_DIR` is the
tiny model shipped with the package; stdout is a pseudo-terminal of `columns` x 50 (so the commands
print what a person sees in a terminal, tables included), stdin is empty; `TZ=UTC`, `LC_ALL=C.UTF-8`,
`NO_COLOR=1`, `PYTHONHASHSEED=0`, `CUDA_VISIBLE_DEVICES=""`, one OpenMP/MKL thread.

Scrub rules, applied to every output in this order (`SCRUBS` below, documented here):
1. ANSI escape sequences are removed, `\\r\\n` becomes `\\n`, a line rewritten with `\\r` keeps its last
   state, trailing blanks are dropped.
2. The scratch folder's absolute path becomes `.` and the repository's becomes `<repo>`.
3. Values that measure time are masked with `#`: ISO-8601 timestamps anywhere and run identifiers that
   embed one (`classify-20261129T104819-7013a2`) digit by digit (their width is fixed); the value of a
   field whose name matches `TIMED_FIELD` (`seconds`, `embed_seconds`, `images/s`, `*_at`, …) in a
   field/value table (`│ seconds │ 17.2 │`, or `seconds   17.2` / TSV as the output layer prints it), a JSON object (`"seconds": 17.2`) or a `key: value` line,
   one `#` per run of digits (`17.2` → `#.#`), padded to the cell's width so tables stay aligned; and
   every number of a timing line (`Done in 56 s: synth 4 s, …`), one `#` per run of digits.
Anything else that differs between two runs is a bug in the command (or a name to add to `TIMED_FIELD`).
"""

from __future__ import annotations

import argparse
import difflib
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_COLUMNS = 100
COMMAND_TIMEOUT_S = 900

#: A field whose name matches this measures time or speed (`seconds`, `embed_seconds`, `images/s`, `wall_s`,
#: `images_per_s`, `updated_at`, `elapsed`): its value is masked wherever it appears as a field/value pair.
TIMED_FIELD = r"[A-Za-z_/]*(?:seconds|_s|/s|_at|elapsed)"
TIMING_LINE_RE = re.compile(r"^Done in \d.*$", re.M)  # the demo's last line: stage timings

# A marker starts a line (so prose may quote one in backticks without running it).
MARKER_RE = re.compile(
    r"^<!-- \[\[\[(?P<kind>run|setup)(?P<options>[^:\]\n]*):(?P<body>.*?)\]\]\] -->\n", re.S | re.M
)
END_MARKER = "<!-- [[[end]]] -->"
END_RE = re.compile(r"^<!-- \[\[\[end\]\]\] -->$", re.M)


class ReadmeError(Exception):
    """A marker that cannot be parsed or a command that did not behave as its marker says."""


@dataclass(frozen=True)
class Marker:
    """One `[[[run …]]]` (with the generated text it owns) or `[[[setup …]]]` marker of a README."""

    kind: str
    commands: tuple[str, ...]
    start: int  # offset just after the marker line
    end: int  # offset of the `[[[end]]]` marker (== start for setup markers)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def expected_exit(self) -> int:
        return int(self.options.get("exit", "0"))


def parse(text: str) -> list[Marker]:
    """Find every marker in README text, in order; a run marker without its `[[[end]]]` is an error."""
    markers: list[Marker] = []
    for match in MARKER_RE.finditer(text):
        kind = match["kind"]
        commands = tuple(line.strip() for line in match["body"].splitlines() if line.strip())
        line_no = text.count("\n", 0, match.start()) + 1
        if not commands:
            raise ReadmeError(f"line {line_no}: a [[[{kind}]]] marker has no command")
        options = _parse_options(match["options"], line_no)
        if kind == "setup":
            markers.append(Marker(kind, commands, match.end(), match.end(), options))
            continue
        end_match = END_RE.search(text, match.end())
        end = end_match.start() if end_match else -1
        following = MARKER_RE.search(text, match.end())
        if end < 0 or (following is not None and following.start() < end):
            raise ReadmeError(f"line {line_no}: [[[run]]] marker without its {END_MARKER}")
        markers.append(Marker(kind, commands, match.end(), end, options))
    return markers


def _parse_options(raw: str, line_no: int) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in raw.split():
        key, _, value = token.partition("=")
        if key not in ("stderr", "exit", "head", "columns"):
            raise ReadmeError(f"line {line_no}: unknown marker option {key!r}")
        if key in ("exit", "head", "columns") and not value.isdigit():
            raise ReadmeError(f"line {line_no}: option {key} needs a number, got {value!r}")
        options[key] = value or "1"
    return options


@dataclass
class Workspace:
    """The scratch folder and fixed environment every command of one README runs in."""

    path: Path
    env: dict[str, str]

    @classmethod
    def create(cls, path: Path) -> Workspace:
        (path / "cxr").symlink_to(ROOT / "cxr")  # `./cxr --help` works as in a clone
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CXR_EMBED_", "PYTEST_", "COV_")) and key not in ("COLUMNS", "LINES")
        }
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
            CXR_EMBED_MODEL_DIR=str(ROOT / "cxr_embed" / "assets" / "tiny-model"),
            TZ="UTC",
            LC_ALL="C.UTF-8",
            NO_COLOR="1",
            TERM="xterm",
            PYTHONHASHSEED="0",
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        return cls(path, env)

    def run(self, command: str, *, stderr: bool = False, columns: int = DEFAULT_COLUMNS) -> tuple[int, str]:
        """Run one command with stdout on a pseudo-terminal; return (exit status, scrubbed output)."""
        env = dict(self.env, COLUMNS=str(columns), LINES="50")
        primary, secondary = pty.openpty()
        _set_window_size(secondary, columns)
        process = subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=self.path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary if stderr else subprocess.DEVNULL,
        )
        os.close(secondary)
        chunks: list[bytes] = []
        while True:
            ready, _, _ = select.select([primary], [], [], COMMAND_TIMEOUT_S)
            if not ready:
                process.kill()
                raise ReadmeError(f"`{command}` printed nothing for {COMMAND_TIMEOUT_S} s")
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(primary)
        status = process.wait()
        return status, scrub(b"".join(chunks).decode("utf-8", "replace"), self.path)


def _set_window_size(fd: int, columns: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))


ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>()][0-9A-Za-z]?")
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")
RUN_ID_RE = re.compile(r"\b(?P<prefix>[a-z]+-)(?P<stamp>\d{8}T\d{6}-[0-9a-f]{6})\b")


def _mask_digits(value: str) -> str:
    """Timestamps and run ids have a fixed width: mask every digit, keep the shape."""
    return re.sub(r"[0-9a-f]" if re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{6}", value) else r"\d", "#", value)


def _mask_measure(match: re.Match[str]) -> str:
    """A measured value's width varies run to run (9.5 s, 12.3 s): each digit run becomes one `#`, and the
    cell keeps its width so the table around it stays aligned."""
    masked = re.sub(r"\d+", "#", match["value"])
    if not match["pad"]:
        return match["key"] + masked
    return match["key"] + masked.ljust(len(match["value"]) + len(match["pad"]))


TIMED_PATTERNS = [
    re.compile(rf"(?P<key>[│|]\s*{TIMED_FIELD}\s*[│|]\s*)(?P<value>[^│|\s]+)(?P<pad> *)"),  # table row
    re.compile(rf'(?P<key>"{TIMED_FIELD}"\s*:\s*)(?P<value>"[^"]*"|[-+0-9.eE]+)(?P<pad>)'),  # JSON
    re.compile(rf"(?P<key>^\s*{TIMED_FIELD}\s*[:=]\s*)(?P<value>\S+)(?P<pad>)", re.M),  # key: value line
    re.compile(rf"(?P<key>^\s*{TIMED_FIELD}(?: {{2,}}|\t))(?P<value>\S+)(?P<pad>)", re.M),  # field  value
]


def scrub(output: str, workspace: Path) -> str:
    """Apply the documented scrub rules (module docstring) so two runs print the same text."""
    output = ANSI_RE.sub("", output).replace("\r\n", "\n")
    output = "\n".join(line.rsplit("\r", 1)[-1].rstrip() for line in output.split("\n"))
    for path, name in ((workspace.resolve(), "."), (workspace, "."), (ROOT, "<repo>")):
        output = output.replace(f"{path}/", "" if name == "." else f"{name}/").replace(str(path), name)
    output = TIMESTAMP_RE.sub(lambda m: _mask_digits(m.group(0)), output)
    output = RUN_ID_RE.sub(lambda m: m["prefix"] + _mask_digits(m["stamp"]), output)
    for pattern in TIMED_PATTERNS:
        output = pattern.sub(_mask_measure, output)
    output = TIMING_LINE_RE.sub(lambda m: re.sub(r"\d+", "#", m.group(0)), output)
    return output.strip("\n")


def _head(output: str, head: str | None) -> str:
    if head is None:
        return output
    lines = output.split("\n")
    return output if len(lines) <= int(head) else "\n".join([*lines[: int(head)], "…"])


def render_block(marker: Marker, workspace: Workspace) -> str:
    """Run a marker's commands and return the generated text it owns (a ```console block)."""
    parts: list[str] = []
    for command in marker.commands:
        status, output = workspace.run(
            command,
            stderr="stderr" in marker.options,
            columns=int(marker.options.get("columns", DEFAULT_COLUMNS)),
        )
        output = _head(output, marker.options.get("head"))
        if status != marker.expected_exit:
            raise ReadmeError(
                f"`{command}` exited {status}, the README's marker expects {marker.expected_exit}:\n{output}"
            )
        parts.append(f"$ {command}")
        if output:
            parts.append(output)
    return "```console\n" + "\n".join(parts) + "\n```\n"


def regenerate(text: str, scratch: Path) -> str:
    """Return the README text with every run block replaced by the output of a fresh run."""
    markers = parse(text)
    workspace = Workspace.create(scratch)
    pieces: list[str] = []
    position = 0
    for marker in markers:
        if marker.kind == "setup":
            command = " && ".join(marker.commands)
            status, output = workspace.run(command, stderr=True)
            if status != 0:
                raise ReadmeError(f"setup `{command}` exited {status}:\n{output}")
            continue
        pieces.append(text[position : marker.start])
        pieces.append(render_block(marker, workspace))
        position = marker.end
    pieces.append(text[position:])
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when the README is stale")
    mode.add_argument("--update", action="store_true", help="rewrite the marked blocks in place")
    parser.add_argument("--readme", type=Path, default=README, help="the Markdown file (default: README.md)")
    parser.add_argument(
        "--keep", type=Path, help="run in this folder (kept afterwards) instead of a temp one"
    )
    args = parser.parse_args(argv)

    text = args.readme.read_text()
    try:
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            args.keep.mkdir(parents=True)
            fresh = regenerate(text, args.keep.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="cxr-readme-") as scratch:
                fresh = regenerate(text, Path(scratch))
    except ReadmeError as error:
        print(f"Error: {args.readme}: {error}", file=sys.stderr)
        return 1
    blocks = sum(1 for marker in parse(text) if marker.kind == "run")
    if fresh == text:
        print(f"{args.readme}: {blocks} real-output block(s) up to date", file=sys.stderr)
        return 0
    if args.update:
        args.readme.write_text(fresh)
        print(f"{args.readme}: real-output blocks regenerated", file=sys.stderr)
        return 0
    diff = difflib.unified_diff(
        text.splitlines(keepends=True),
        fresh.splitlines(keepends=True),
        "README (as written)",
        "README (as run)",
    )
    sys.stdout.writelines(diff)
    print(
        f"\n{args.readme} is stale: a real-output block differs from what its command prints now. "
        "Run `python docs/readme.py --update` (never edit a generated block by hand).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())

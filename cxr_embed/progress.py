"""Progress bars on stderr, shared by every long-running job.

Library functions take ``progress: bool`` (or a :class:`Progress`) rather than printing, so that
results on stdout stay machine-readable and tests stay quiet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

stderr_console = Console(stderr=True)
BAR_WIDTH = 12
"""Narrow, so that a bar with its count, rate, time left and note fits an 80-column terminal."""
_silenced = False


def silence() -> None:
    """Turn every progress bar of this process off (``cxr-embed --quiet``)."""
    global _silenced
    _silenced = True


@dataclass
class Progress:
    """A handle to one bar: ``advance(n)`` and ``note(text)`` (e.g. ``"loss 0.41"``).

    The rate shown is items per second since the bar started, which is what users compare
    against GPU throughput.
    """

    _bar: _RichProgress | None = None
    _task: int | None = None
    _start: float = field(default_factory=time.perf_counter)
    done: int = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None and self._task is not None:
            rate = self.done / max(time.perf_counter() - self._start, 1e-9)
            self._bar.update(self._task, advance=n, rate=f"{rate:,.1f}/s")

    def note(self, text: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, note=text)


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Progress]:
    """Yield a :class:`Progress`; draws a rich bar on stderr only when ``enabled`` and stderr is a terminal.

    A bar is never drawn into a pipe or log file (where it would be one stale line per run), but it is
    drawn with ``--json``: results go to stdout, so the bar on a terminal's stderr does not mix with them.
    """
    if not enabled or _silenced or not _is_terminal(sys.stderr):
        yield Progress()
        return
    bar = _RichProgress(  # ~80 columns: a short bar, count, rate, time left and a short note
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=stderr_console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, rate="", note="")
        yield Progress(_bar=bar, _task=task)


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream is not None and stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False

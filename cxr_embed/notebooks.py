"""Run the example notebooks (``notebooks/*.ipynb``) on a store, and the helpers they share.

The notebooks read only a store: its path comes from ``$CXR_EMBED_STORE`` and their figures go to
``$CXR_EMBED_FIGURES`` (default: a ``figures/`` folder next to the store). Passing both through the
environment, rather than editing cells, keeps the committed notebooks output-free and lets CI, the
demo and a user in Jupyter run the very same file. Figures are PNG files named ``<NN>_<what>.png``
after the notebook's number, so a run can tell which notebook produced which figure.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_embed.errors import ConfigError, CxrEmbedError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cxr_embed.store import Store

STORE_ENV = "CXR_EMBED_STORE"
FIGURES_ENV = "CXR_EMBED_FIGURES"
NOTEBOOKS = (
    "01_quickstart.ipynb",
    "02_frozen_vs_finetuned.ipynb",
    "03_retrieval_gallery.ipynb",
    "04_embedding_map.ipynb",
)


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source checkout (the notebooks are not installed as package data)."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def store_path(path: str | Path | None = None) -> Path:
    """``path`` if given, else ``$CXR_EMBED_STORE``; a clear error when neither says where the store is."""
    chosen = path if path is not None else os.environ.get(STORE_ENV)
    if not chosen:
        raise ConfigError(
            f"No store given: set {STORE_ENV} to a store directory (e.g. the one `cxr-embed demo` made) "
            "before running the notebook."
        )
    return Path(chosen).expanduser().resolve()


def open_store(path: str | Path | None = None) -> Store:
    """Open the store the notebook is about (see :func:`store_path`)."""
    from cxr_embed.store import Store

    return Store.open(store_path(path))


def figures_dir(store: str | Path | None = None) -> Path:
    """``$CXR_EMBED_FIGURES``, else ``figures/`` next to the store; created if missing."""
    env = os.environ.get(FIGURES_ENV)
    folder = Path(env).expanduser() if env else store_path(store).parent / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig: Figure, name: str, store: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` (150 dpi, tight) and return the path."""
    path = figures_dir(store) / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where the executed copy went, how long it took, which figures it wrote."""

    notebook: str
    executed_path: Path | None
    seconds: float
    figures: list[Path]


def run_notebook(
    notebook: str | Path,
    store: str | Path,
    *,
    figures: str | Path | None = None,
    out_dir: str | Path | None = None,
    timeout: int = 600,
    kernel_name: str = "python3",
) -> NotebookRun:
    """Execute one notebook on ``store`` in a fresh kernel of the current interpreter.

    The kernel gets ``CXR_EMBED_STORE``/``CXR_EMBED_FIGURES`` in its environment and runs in the
    notebook's folder. The executed copy (with outputs) is written to ``out_dir`` when given; the
    committed notebook is never modified. A failing cell raises :class:`CxrEmbedError` naming the
    notebook and the cell's error.
    """
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb_path = Path(notebook)
    if not nb_path.is_absolute() and not nb_path.exists():
        nb_path = notebooks_dir() / nb_path
    if not nb_path.is_file():
        raise ConfigError(f"Notebook not found: {nb_path}. Run from a source checkout that has notebooks/.")
    store_dir = store_path(store)
    fig_dir = Path(figures).expanduser().resolve() if figures is not None else store_dir.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, STORE_ENV: str(store_dir), FIGURES_ENV: str(fig_dir)}
    prefix = nb_path.name.split("_", 1)[0] + "_"
    before = {p: p.stat().st_mtime_ns for p in fig_dir.glob(f"{prefix}*.png")}

    nb = nbformat.read(nb_path, as_version=4)
    start = time.perf_counter()
    error: CellExecutionError | None = None
    # Quiet and local: the kernel talks over unix sockets in a private folder (no TCP port, so no
    # "running over TCP without encryption" warning), and its own log lines ([IPKernelApp] WARNING …)
    # go to a file that is shown only when the notebook fails.
    with (
        tempfile.TemporaryDirectory(prefix="cxr-embed-kernel-") as sockets,
        tempfile.TemporaryFile("w+") as log,
    ):
        # ipykernel's own spec for "python3" launches sys.executable, so the kernel sees this venv's packages.
        km = KernelManager(kernel_name=kernel_name, transport="ipc", ip=os.path.join(sockets, "kernel"))
        client = NotebookClient(
            nb, km=km, timeout=timeout, resources={"metadata": {"path": str(nb_path.parent)}}
        )
        try:
            client.execute(env=env, stderr=log)
        except CellExecutionError as exc:
            error = exc
        log.seek(0)
        kernel_log = log.read()[-2000:]
    seconds = time.perf_counter() - start
    executed = None
    if out_dir is not None:
        executed = Path(out_dir) / nb_path.name
        executed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed)
    if error is not None:
        where = f" (executed copy with the traceback: {executed})" if executed else ""
        log_tail = f"\nKernel log:\n{kernel_log}" if kernel_log.strip() else ""
        raise CxrEmbedError(f"Notebook {nb_path.name} failed on store {store_dir}{where}:\n{error}{log_tail}")
    written = sorted(p for p in fig_dir.glob(f"{prefix}*.png") if before.get(p) != p.stat().st_mtime_ns)
    return NotebookRun(notebook=nb_path.name, executed_path=executed, seconds=seconds, figures=written)


def run_notebooks(
    store: str | Path,
    *,
    figures: str | Path | None = None,
    out_dir: str | Path | None = None,
    names: tuple[str, ...] = NOTEBOOKS,
    timeout: int = 600,
) -> list[NotebookRun]:
    """Execute the example notebooks in order on ``store`` (see :func:`run_notebook`)."""
    return [
        run_notebook(notebooks_dir() / name, store, figures=figures, out_dir=out_dir, timeout=timeout)
        for name in names
    ]

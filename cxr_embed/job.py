"""``cxr-embed index`` as a library call: pick the engine, run the one job pipeline.

The stages live in :mod:`cxr_embed.pipeline` and never import an engine; this module is the only
place that knows which engines exist (``local``: :mod:`cxr_embed.local_engine`, ``ray``:
:mod:`cxr_embed.ray_engine`), so engines and the job import neither each other nor this module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_embed.errors import DependencyError
from cxr_embed.pipeline import Engine, IndexConfig, IndexSummary, list_for_job, run_job
from cxr_embed.store import StoreLock, local_store_path, recorded_model_dir

if TYPE_CHECKING:
    from cxr_embed.model import MedImageInsight

__all__ = ["IndexConfig", "IndexSummary", "make_engine", "run_index"]


def run_index(
    source: str | Path,
    store_dir: str | Path,
    config: IndexConfig | None = None,
    progress: bool = True,
    *,
    model: MedImageInsight | None = None,
) -> IndexSummary:
    """Embed every image under ``source`` that ``store_dir`` does not hold yet, then (re)index.

    ``model`` lets a caller pass an already loaded model to the local engine (benchmarks, notebooks);
    otherwise ``config.model_dir`` / device / precision are loaded. Raises StoreLockedError when
    another writer is active and StoreMismatchError when the store was made with another model.
    """
    config = config or IndexConfig()
    config.check()
    start = time.perf_counter()
    fresh = not local_store_path(store_dir).exists()
    lock = StoreLock(store_dir).acquire()  # before the model loads: a second writer is refused at once
    if model is None and config.model_dir is None:  # a rerun finds the model the store was made with
        config = dataclasses.replace(config, model_dir=recorded_model_dir(store_dir))
    try:
        # listing first: a wrong de-identification key or bad reader option is refused before the model loads
        listing = list_for_job(source, store_dir, config, progress)  # InputError when the source is empty
        engine = make_engine(config, model)
    except BaseException:
        lock.release()
        if fresh:  # refused before any write: leave no half-made store folder behind (only the lock is there)
            _remove_lock_only_folder(local_store_path(store_dir))
        raise
    with lock:
        return run_job(engine, source, store_dir, config, progress, lock=lock, start=start, listing=listing)


def _remove_lock_only_folder(folder: Path) -> None:
    """Remove ``folder`` when the lock file is all it holds (this run made it and wrote nothing else)."""
    from cxr_embed.store.layout import LOCK_FILE

    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        folder.rmdir()


def make_engine(config: IndexConfig, model: MedImageInsight | None = None) -> Engine:
    """The engine ``config.engine`` names, ready to run (the local one with its model loaded)."""
    if config.engine == "ray":
        if importlib.util.find_spec("cxr_embed.ray_engine") is None:
            raise DependencyError(
                "The Ray engine is not available in this installation (no cxr_embed.ray_engine). "
                "Use --engine local, or install a cxr-embed version with Ray support: pip install 'cxr-embed[ray]'."
            )
        from cxr_embed.ray_engine import RayEngine

        return RayEngine(config)
    from cxr_embed.local_engine import LocalEngine

    return LocalEngine(config, model)

"""The model a store was built with: found from the store itself, so queries need no ``--model-dir``.

A store records the model folder used by ``cxr-embed index`` and its checkpoint's sha256. Commands
that embed new inputs against a store (``search --text/--image``, ``predict``, ``serve``) load that
folder when the checkpoint there still has the recorded sha256; ``--model-dir`` overrides it, and any
checkpoint whose identity differs from the store's is refused (its embeddings would not be
comparable).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cxr_embed.errors import ModelNotFoundError

if TYPE_CHECKING:
    from cxr_embed.model import MedImageInsight
    from cxr_embed.store.reader import Store


def store_model_dir(store: Store, model_dir: str | Path | None = None) -> str | Path | None:
    """The folder to load: ``model_dir`` if given, else the recorded one if it still exists, else None
    (the usual resolution: ``$CXR_EMBED_MODEL_DIR``, then the pull cache)."""
    if model_dir is not None:
        return model_dir
    recorded = store.model_dir
    if recorded and Path(recorded).is_dir():
        return recorded
    return None


def load_store_model(
    store: Store, model_dir: str | Path | None = None, *, device: str = "auto", precision: str = "fp32"
) -> MedImageInsight:
    """Load the model ``store`` was built with; StoreMismatchError when the checkpoint differs.

    Raises ModelNotFoundError naming the folder and checksum needed when no model can be found.
    """
    from cxr_embed.model import MedImageInsight

    folder = store_model_dir(store, model_dir)
    try:
        model = MedImageInsight.load(folder, device=device, precision=precision)
    except ModelNotFoundError as exc:
        where = (
            f"was built with the model in {store.model_dir}, which is no longer there"
            if store.model_dir
            else "does not record its model folder"
        )
        raise ModelNotFoundError(
            f"Store {store.path} {where}. Pass --model-dir with a MedImageInsight folder whose checkpoint has "
            f"sha256 {store.checkpoint_sha256} ({store.model_id}). ({exc})"
        ) from None
    store.check_compatible(model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint())
    return model


def recorded_model_dir(path: str | Path) -> str | None:
    """The model folder a store at ``path`` recorded, if it still exists; None for a new or unreadable store.

    Lets a rerun of ``cxr-embed index`` on an existing store find its model without ``--model-dir``
    (a damaged store is then reported by the writer, with its own message).
    """
    from cxr_embed.errors import CxrEmbedError
    from cxr_embed.store.layout import local_store_path, read_manifest

    try:
        recorded = read_manifest(local_store_path(path)).get("model_dir")
    except (CxrEmbedError, OSError):
        return None
    return recorded if isinstance(recorded, str) and Path(recorded).is_dir() else None

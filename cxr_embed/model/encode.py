"""Ad hoc embedding of a few images and texts (``cxr-embed encode``) and writing them to .npy/.parquet.

For whole datasets use the store (``cxr-embed index``); this is for quick looks, scripts and parity
checks. An unreadable image never crashes the call, and row i of the result is always input i: a
failed image is a row of NaN with its reason in ``errors`` (an ``error`` column in Parquet). A ``.npy``
cannot carry the reason, so writing one with failures is refused unless the failed rows are dropped
(``skip_failed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_embed.errors import ConfigError, CxrEmbedError
from cxr_embed.model.medimageinsight import MedImageInsight
from cxr_embed.records import ReadFailure

OUTPUT_SUFFIXES = (".npy", ".parquet")


@dataclass
class EncodeResult:
    """One row per input in order: the images first, then the texts. Failed images are NaN rows."""

    kinds: list[str]              # "image" | "text", one per row
    sources: list[str]            # the image path or the text, one per row
    embeddings: np.ndarray        # (rows, D) float32; NaN rows for images that could not be read
    failures: list[ReadFailure] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)  # one per row: None, or why it failed

    def without_failed(self) -> EncodeResult:
        """Only the rows that were embedded (row i is then no longer input i)."""
        keep = [i for i, e in enumerate(self.errors) if e is None]
        return EncodeResult([self.kinds[i] for i in keep], [self.sources[i] for i in keep],
                            self.embeddings[keep], self.failures, [None] * len(keep))


def encode_inputs(model: MedImageInsight, images: Sequence[str | Path] = (), texts: Sequence[str] = (),
                  normalize: bool = True, batch_size: int = 8) -> EncodeResult:
    """Embed ``images`` (files) and ``texts``; an unreadable image is a NaN row listed in ``failures``."""
    import torch

    from cxr_embed.imageio import read_image

    tensors, kept, failures = [], [], []
    errors: list[str | None] = [None] * (len(images) + len(texts))
    for i, path in enumerate(images):
        try:
            tensors.append(model.preprocessor(read_image(path)))
            kept.append(i)
        except CxrEmbedError as exc:
            failures.append(ReadFailure(Path(path).name, str(path), "read", str(exc)))
            errors[i] = str(exc)
    embeddings = np.full((len(images) + len(texts), model.embed_dim), np.nan, dtype=np.float32)
    for start in range(0, len(tensors), batch_size):
        chunk = model.encode_images(torch.stack(tensors[start : start + batch_size]), normalize=normalize)
        embeddings[kept[start : start + batch_size]] = chunk.numpy()
    if texts:
        embeddings[len(images) :] = model.encode_texts(list(texts), normalize=normalize).numpy()
    return EncodeResult(["image"] * len(images) + ["text"] * len(texts), [str(p) for p in images] + list(texts),
                        embeddings, failures, errors)


def write_embeddings(result: EncodeResult, out: str | Path, model: MedImageInsight, skip_failed: bool = False) -> Path:
    """``.npy``: the (rows, D) array. ``.parquet``: row, kind, source, embedding, error + model provenance.

    With failures a ``.npy`` is refused unless ``skip_failed`` (which drops the failed rows, in both formats).
    """
    from cxr_embed.atomicio import atomic_path, write_parquet_atomic

    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end with {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}.")
    if skip_failed:
        result = result.without_failed()
    elif result.failures and out.suffix == ".npy":
        raise ConfigError(
            f"{len(result.failures)} image(s) could not be read, so row i of a .npy would not be input i: "
            "write .parquet (failed rows are NaN with an `error` column) or add --skip-failed to drop them."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, result.embeddings)
        return out
    import pyarrow as pa

    dim = result.embeddings.shape[1]
    n = len(result.kinds)
    flat = pa.array(result.embeddings.reshape(-1), type=pa.float32())
    table = pa.table({
        "row": pa.array(range(n), pa.int64()),
        "kind": pa.array(result.kinds, pa.string()),
        "source": pa.array(result.sources, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "error": pa.array(result.errors or [None] * n, pa.string()),
        "model_id": pa.array([model.model_id] * n, pa.string()),
        "checkpoint_sha256": pa.array([model.checkpoint_sha256] * n, pa.string()),
        "preprocess_fingerprint": pa.array([model.preprocessor.fingerprint()] * n, pa.string()),
    })
    return write_parquet_atomic(table, out)

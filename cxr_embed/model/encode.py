"""Ad hoc embedding of a few images and texts (``cxr-embed encode``) and writing them to .npy/.parquet.

For whole datasets use the store (``cxr-embed index``); this is for quick looks, scripts and parity
checks. An unreadable image is reported and skipped, never a crash of the whole call.
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
    """Rows of ``embeddings`` in order: the readable images first, then the texts."""

    kinds: list[str]              # "image" | "text", one per row
    sources: list[str]            # the image path or the text, one per row
    embeddings: np.ndarray        # (rows, D) float32
    failures: list[ReadFailure] = field(default_factory=list)


def encode_inputs(model: MedImageInsight, images: Sequence[str | Path] = (), texts: Sequence[str] = (),
                  normalize: bool = True, batch_size: int = 8) -> EncodeResult:
    """Embed ``images`` (files) and ``texts``; unreadable images go to ``failures``."""
    import torch

    from cxr_embed.imageio import read_image

    tensors, kept, failures = [], [], []
    for path in images:
        try:
            tensors.append(model.preprocessor(read_image(path)))
            kept.append(str(path))
        except CxrEmbedError as exc:
            failures.append(ReadFailure(Path(path).name, str(path), "read", str(exc)))
    chunks = [model.encode_images(torch.stack(tensors[i : i + batch_size]), normalize=normalize)
              for i in range(0, len(tensors), batch_size)]
    if texts:
        chunks.append(model.encode_texts(list(texts), normalize=normalize))
    embeddings = (torch.cat(chunks).numpy() if chunks else np.empty((0, model.embed_dim), np.float32))
    return EncodeResult(["image"] * len(kept) + ["text"] * len(texts), kept + list(texts),
                        embeddings.astype(np.float32, copy=False), failures)


def write_embeddings(result: EncodeResult, out: str | Path, model: MedImageInsight) -> Path:
    """``.npy``: the (rows, D) array. ``.parquet``: kind, source, embedding + model provenance columns."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end with {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, result.embeddings)
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = result.embeddings.shape[1]
    flat = pa.array(result.embeddings.reshape(-1), type=pa.float32())
    table = pa.table({
        "row": pa.array(range(len(result.kinds)), pa.int64()),
        "kind": pa.array(result.kinds, pa.string()),
        "source": pa.array(result.sources, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "model_id": pa.array([model.model_id] * len(result.kinds), pa.string()),
        "checkpoint_sha256": pa.array([model.checkpoint_sha256] * len(result.kinds), pa.string()),
        "preprocess_fingerprint": pa.array([model.preprocessor.fingerprint()] * len(result.kinds), pa.string()),
    })
    pq.write_table(table, out)
    return out

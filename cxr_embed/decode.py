"""The decode stage every image job shares: records → uint8 resized tensors, bad files → ReadFailure.

Used by ``index`` (local DataLoader workers and Ray decode tasks), ``predict`` and fine-tuning, so a
file that one command can read every other command reads the same way, and a file that fails is
reported by all of them as the same :class:`~cxr_embed.records.ReadFailure` (stage ``"decode"``).

Why uint8: the decode workers stop at the resize output (:meth:`Preprocessor.to_uint8`, 675 KiB per
480² image); :meth:`Preprocessor.normalize` turns it into float32 where the model runs. That moves
a quarter of the bytes through shared memory and over PCIe, and the float32 operation order is the
same as the one-image path, so CPU embeddings stay bitwise equal.

Usage (any job)::

    loader = make_loader(records, model.preprocessor, batch_size=32, workers=4, pin_memory=True)
    for batch in loader:                      # a DecodedBatch, in input order
        report(batch.failures)                # ReadFailure rows, stage "decode"
        if batch.pixels is not None:          # (B, 3, S, S) uint8 for records[batch.indices]
            x = model.preprocessor.normalize(batch.pixels.to(device, non_blocking=True))

``batches=`` takes explicit index lists instead of ``batch_size`` (e.g. a seeded training order) and
``seed=`` fixes the DataLoader's own generator (worker seeds) so resumed runs draw the same streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_embed.errors import CxrEmbedError
from cxr_embed.records import ImageRecord, ReadFailure

if TYPE_CHECKING:
    import torch

    from cxr_embed.preprocessing import Preprocessor

DECODE_STAGE = "decode"


class DecodeDataset:
    """``dataset[i]`` → ``(i, uint8 (3, S, S) tensor)`` or ``(i, ReadFailure)``; never raises.

    A file that fails inside a DataLoader worker must come back as data: an exception would kill the
    whole loader (and the job) for one bad file.
    """

    def __init__(self, records: Sequence[ImageRecord], preprocessor: Preprocessor):
        self.records = list(records)
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | ReadFailure]:
        from cxr_embed.listing import failure_for

        record = self.records[i]
        item = decode_image(record.path, self.preprocessor, record.image_id, frame=record.frame)
        # a de-identified record's failure names its reference, never the real path
        return i, failure_for(record, item.stage, item.reason) if isinstance(item, ReadFailure) else item


def decode_image(
    path: str | Path, preprocessor: Preprocessor, image_id: str | None = None, *, frame: int | None = None
) -> torch.Tensor | ReadFailure:
    """One file → its uint8 (3, S, S) resize output, or the ReadFailure (stage "decode") saying why not.

    ``image_id`` names the failure (default: the path), as the store's errors table does; ``frame``:
    which frame of a multi-frame file (None: its only or first).
    """
    from cxr_embed.imageio import read_image

    try:
        return preprocessor.to_uint8(read_image(path, frame))
    except (
        Exception
    ) as exc:  # decoder boundary: whatever a bad file (or odd pixel data) raises is that file's failure
        reason = str(exc) if isinstance(exc, CxrEmbedError) else f"{type(exc).__name__}: {exc}"
        return ReadFailure(image_id or str(path), str(path), DECODE_STAGE, reason)


@dataclass
class DecodedBatch:
    """One batch from :func:`make_loader`: the good images stacked, the failures aside.

    ``indices``: positions (in the loader's records) of the rows of ``pixels``; ``pixels``: (B, 3, S, S)
    uint8, None when every image of the batch failed; ``failures``: the others.
    """

    indices: list[int]
    pixels: torch.Tensor | None
    failures: list[ReadFailure] = field(default_factory=list)

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``) so H2D copies can be async."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        return DecodedBatch(self.indices, pixels, self.failures)


def collate(items: list[tuple[int, torch.Tensor | ReadFailure]]) -> DecodedBatch:
    """Stack the decoded images of a batch; keep the failures aside."""
    import torch

    good = [(i, t) for i, t in items if not isinstance(t, ReadFailure)]
    return DecodedBatch(
        indices=[i for i, _ in good],
        pixels=torch.stack([t for _, t in good]) if good else None,
        failures=[t for _, t in items if isinstance(t, ReadFailure)],
    )


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # one decode per worker process; N workers already fill N cores


def make_loader(
    records: Sequence[ImageRecord],
    preprocessor: Preprocessor,
    *,
    batch_size: int | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
    seed: int | None = None,
) -> torch.utils.data.DataLoader:
    """The ordered, parallel decode stage over ``records``, yielding :class:`DecodedBatch`.

    Give ``batch_size`` (consecutive batches in input order) or ``batches`` (explicit index lists).
    ``workers=0`` decodes in the calling process; ``pin_memory`` when the consumer copies to CUDA.
    """
    import torch
    from torch.utils.data import DataLoader

    if (batch_size is None) == (batches is None):
        raise ValueError("make_loader needs exactly one of batch_size or batches")
    sizing = {"batch_size": batch_size, "shuffle": False} if batches is None else {"batch_sampler": batches}
    return DataLoader(
        DecodeDataset(records, preprocessor),
        **sizing,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
    )

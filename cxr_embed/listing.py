"""The listing stage of every job: a source folder → records, failures, and what a resume must match.

Why a seam of its own: the index job (local or Ray), fine-tuning and ``predict`` all start by listing
a source, and the listing decides things the store must remember — the de-identification key's
fingerprint for DICOM, the keyed references that replace paths, the link file that maps them back
(kept by the data owner, outside the store). The job calls :func:`list_source` and never needs to
know which reader ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_embed.records import ImageRecord, ReadFailure, read_dataset


@dataclass
class Listing:
    """What :func:`list_source` found.

    ``records``: the images to consider, in a deterministic order (row_ids follow it).
    ``failures``: listed inputs that cannot be used (stage + reason; they go to ``errors.parquet``).
    ``identity``: values a store made from this source must keep across resumes (e.g.
    ``{"id_key_fingerprint": "…"}`` for DICOM); the writer refuses a resume whose identity differs.
    ``link_file``: where the mapping from stored references back to files was written, if anywhere.
    """

    records: list[ImageRecord]
    failures: list[ReadFailure] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)
    link_file: Path | None = None
    dataset: str = "auto"


def list_source(source: str | Path, dataset: str = "auto", *, options: dict[str, Any] | None = None,
                cache_dir: Path | None = None, link_file: Path | None = None,
                progress: bool = False) -> Listing:
    """List ``source`` with the reader for ``dataset`` (``options`` are the reader's options).

    ``cache_dir``: a folder the listing may use to skip re-reading unchanged files on a resume (the
    store passes ``<store>/cache``; it must never hold identifiers). ``link_file``: where to write
    stored-reference → file mappings when the reader replaces paths.
    """
    failures: list[ReadFailure] = []
    records = read_dataset(source, dataset, errors=failures, **(options or {}))
    return Listing(records=records, failures=failures, dataset=dataset)

"""DICOM listing throughput: files/s for N generated headers, 1..K worker processes, cold and cached.

"Cold" means no listing cache (every header parsed, de-identified in the worker); "cached" is the
rerun a resume does (only stat + keyed digest per file). The OS page cache is warm in both: the
files were just written. Run::

    .venv/bin/python benchmarks/dicom_listing.py --n 20000 --workers 1 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_embed.listing import list_source


def generate(root: Path, n: int) -> None:
    """``n`` small DX files (8x8 pixels: the listing stops before pixel data, so size does not matter)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientSex, ds.PatientAge = (
        "DX",
        "CHEST",
        "PA",
        "F",
        "050Y",
    )
    ds.PatientName, ds.StudyDate, ds.StudyTime, ds.Manufacturer = "SYN^PATIENT", "20200101", "101010", "Acme"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((8, 8), "<u2").tobytes()
    for i in range(n):
        folder = root / f"{i // 500:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        uid = f"1.2.826.0.1.3680043.9.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
        ds.PatientID, ds.StudyInstanceUID = f"P{i // 4}", f"{uid}.1"
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicom-listing-"))
    try:
        src, key = work / "src", work / "key"
        key.write_text("benchmark-key-0123456789abcdef")
        start = time.perf_counter()
        generate(src, args.n)
        print(f"generated {args.n} DICOM files in {time.perf_counter() - start:.1f} s")
        print(f"{'workers':>7}  {'cold files/s':>12}  {'cached files/s':>14}  records")
        for workers in args.workers:
            cache = work / f"store-{workers}" / "cache"
            rates = []
            for _ in ("cold", "cached"):
                start = time.perf_counter()
                listing = list_source(src, "dicom", options={"key_file": str(key), "workers": workers},
                                      cache_dir=cache)  # fmt: skip
                rates.append(args.n / (time.perf_counter() - start))
            print(f"{workers:>7}  {rates[0]:>12,.0f}  {rates[1]:>14,.0f}  {len(listing.records)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

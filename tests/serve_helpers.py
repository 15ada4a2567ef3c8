"""Shared by the serve tests and benchmarks/serve_load.py: a real ``cxr-embed serve`` process on loopback."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

CANARIES = ("CANARY", "7777.424242", "7777.5151", "19010203")
"""Identifying values planted in uploaded DICOMs; none may appear in any response, log or file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dicom_bytes(
    pixels: np.ndarray, *, modality: str = "CR", body_part: str | None = "CHEST", **tags: object
) -> bytes:
    """A Part-10 DICOM of 8-bit ``pixels`` carrying canary identifiers (name, ids, UIDs, birth date)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7777.424242"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7777.5151"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "CANARY^SECRET", "CANARY-PID-4242", "19010203"
    ds.AccessionNumber, ds.InstitutionName = "CANARYACC", "CANARY General Hospital"
    ds.Modality, ds.ViewPosition = modality, "PA"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class ServerProcess:
    """A ``cxr-embed serve`` subprocess; its stdout+stderr go to ``log``."""

    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> int:
        """Ctrl-C (graceful: the audit buffer is flushed), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def pid(self) -> int:
        return self.proc.pid


def start_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> ServerProcess:
    """Start ``cxr-embed serve ARGS --port <free>`` and wait until /healthz answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cxr_embed_cli.main",
        "serve",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    fh = open(log, "wb")  # noqa: SIM115 - closed by the process lifetime
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return ServerProcess(proc, url, log)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout} s:\n{log.read_text(errors='replace')}")

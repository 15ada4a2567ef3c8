"""Settings of ``cxr-embed serve`` and the one rule checked before a socket opens."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxr_embed.errors import ConfigError

CONFIG_ENV = "CXR_EMBED_SERVE_CONFIG"
"""How ``--workers N`` hands the settings to each uvicorn worker process (JSON of :class:`ServeConfig`)."""


@dataclass
class ServeConfig:
    """Everything the app needs; defaults are the CLI's."""

    store: Path
    model_dir: Path | None = None
    classifier: str | None = None
    classifier_run: str | None = None  # None: the latest classify run's file
    key_file: Path | None = None  # the de-identification key (None: readers.deid.load_key's default)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    device: str = "auto"
    precision: str = "fp32"
    keys: Path | None = None
    link_file: Path | None = None
    dicom_port: int | None = None  # C-STORE receiver (pynetdicom), same host
    k: int = 5
    max_k: int = 100
    max_batch: int | None = None  # None: GPU_MAX_BATCH on CUDA, 1 on CPU (see batch_size_for)
    decode_workers: int = field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) // 2)))
    max_wait_ms: float = 5.0
    max_bytes: int = 64 * 2**20
    max_pixels: int = 50_000_000
    max_files: int = 16
    timeout_s: float = 30.0
    ood_percentile: float = 1.0
    ood_sample: int = 2000
    reload_seconds: float = 2.0
    audit_flush_seconds: float = 1.0

    def check(self) -> None:
        """Refuse settings that would expose patients' data: a non-loopback bind without keys."""
        if self.keys is None and not is_loopback(self.host):
            raise ConfigError(
                f"Refusing to listen on {self.host} without API keys: anyone who can reach it could "
                "query the store. Make a key (`cxr-embed serve keys add --keys FILE`) and pass --keys "
                "FILE, or bind to 127.0.0.1."
            )
        if not 0 <= self.ood_percentile <= 100:
            raise ConfigError(f"--ood-percentile must be in [0, 100] (got {self.ood_percentile}).")
        if self.k < 1 or (self.max_batch is not None and self.max_batch < 1) or self.workers < 1:
            raise ConfigError("k, --max-batch and --workers must be at least 1.")

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        raw: dict[str, Any] = json.loads(text)
        paths = {f.name for f in fields(cls) if "Path" in str(f.type)}
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in raw.items()})


GPU_MAX_BATCH = 16


def batch_size_for(config: ServeConfig, device_type: str) -> int:
    """Images per forward: ``--max-batch`` when given; else 16 on a GPU (where a batch costs about as
    much as one image) and 1 on CPU, where batching bought nothing: the tiny model at 1 thread took
    165 vs 174 ms per image at batch 8 vs 1, and a 2-core server at concurrency 32 answered 5.4 req/s
    batched vs 8.9 one at a time (``benchmarks/serve_load.py``)."""
    if config.max_batch is not None:
        return config.max_batch
    return GPU_MAX_BATCH if device_type == "cuda" else 1


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; every other name or address counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

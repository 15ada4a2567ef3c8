"""``cxr-embed model pull``: fetch the official MedImageInsight folder and verify every byte.

Only the six files the model needs are fetched from ``lion-ai/MedImageInsights`` (folder
``2024.09.27``), not the whole repository. Each file's size and sha256 are checked against the
published values, so a truncated download or a changed upstream file is refused rather than
silently giving other embeddings. Files already present and correct are not downloaded again, so
placing the files by hand (machines without network) and running ``pull`` verifies them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cxr_embed.errors import DownloadError
from cxr_embed.model.files import (
    CHECKPOINT_RELPATH,
    CONFIG_NAME,
    OFFICIAL_SUBFOLDER,
    TOKENIZER_RELPATH,
    pull_dir,
    sha256_file,
)

REPO_ID = "lion-ai/MedImageInsights"


@dataclass(frozen=True)
class OfficialFile:
    """A file of the official model folder with its published size (None: not published) and sha256."""

    relpath: str
    size: int | None
    sha256: str


OFFICIAL_FILES = (
    OfficialFile(CONFIG_NAME, None, "fb1ef53988b0128b4ef5ad829862cc80347cc8f4b009cdc70d8534f797c2851c"),
    OfficialFile(CHECKPOINT_RELPATH, 2_464_060_700, "5eeda63bf616a61664bc95b2c09d3b3d7125209e635678bd3f5f324e9bdb1414"),
    OfficialFile(f"{TOKENIZER_RELPATH}/vocab.json", 1_059_961,
                 "1cd0c84552bb5ac2d4ba3bc02da0a7c76da4b8cd4764e56a95b8ba6ef86b7a6c"),
    OfficialFile(f"{TOKENIZER_RELPATH}/merges.txt", 524_619,
                 "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"),
    OfficialFile(f"{TOKENIZER_RELPATH}/tokenizer_config.json", 1_221,
                 "f86e4513fb56e2f3ae42681e61c13f228cb3b4778ebb8220449c10e1b44591b3"),
    OfficialFile(f"{TOKENIZER_RELPATH}/special_tokens_map.json", 537,
                 "b8f8d1bfbf8c250c8095f20b0ad2d4c535679b39a7753f3b77a67db098db9d9b"),
)


@dataclass(frozen=True)
class PulledFile:
    path: Path
    size: int
    sha256: str
    downloaded: bool


@dataclass(frozen=True)
class PullResult:
    model_dir: Path
    revision: str
    files: list[PulledFile]


def verify_file(path: Path, expected: OfficialFile) -> str | None:
    """Why ``path`` is not the published file, or None when it is."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        return f"size {size:,} bytes, expected {expected.size:,}"
    digest = sha256_file(path)
    if digest != expected.sha256:
        return f"sha256 {digest}, expected {expected.sha256}"
    return None


def manual_instructions(model_dir: Path) -> str:
    """How to put the official files in place on a machine without network access."""
    names = ", ".join(f.relpath for f in OFFICIAL_FILES)
    return (f"To install by hand, copy the folder {OFFICIAL_SUBFOLDER}/ of https://huggingface.co/{REPO_ID} "
            f"({names}) to {model_dir} and run `cxr-embed model pull` again to verify it, or put it anywhere and "
            "pass --model-dir (or set $CXR_EMBED_MODEL_DIR).")


def pull(revision: str = "main", dest: str | Path | None = None, endpoint: str | None = None) -> PullResult:
    """Download (when missing or wrong) and verify the official files; returns the model folder.

    ``dest`` is the folder that receives ``2024.09.27/`` (default: the cxr-embed cache). ``endpoint``
    overrides the Hugging Face endpoint (mirrors).
    """
    root = Path(dest).expanduser() if dest is not None else pull_dir()
    model_dir = root / OFFICIAL_SUBFOLDER
    results = []
    for official in OFFICIAL_FILES:
        path = model_dir / official.relpath
        downloaded = False
        if not path.is_file() or verify_file(path, official) is not None:
            _download(official, revision, root, endpoint, model_dir)
            downloaded = True
        problem = verify_file(path, official)
        if problem is not None:
            bad = path.with_name(path.name + ".rejected")
            shutil.move(path, bad)
            raise DownloadError(
                f"{official.relpath} from {REPO_ID}@{revision} is not the published MedImageInsight v1.0.0 file "
                f"({problem}); moved it to {bad}. Retry the pull, or use --revision main. "
                + manual_instructions(model_dir)
            )
        results.append(PulledFile(path, path.stat().st_size, sha256_file(path), downloaded))
    return PullResult(model_dir, revision, results)


def _download(official: OfficialFile, revision: str, root: Path, endpoint: str | None, model_dir: Path) -> None:
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(REPO_ID, f"{OFFICIAL_SUBFOLDER}/{official.relpath}", revision=revision,
                        local_dir=root, endpoint=endpoint, force_download=True)
    except Exception as exc:  # network, HTTP, auth and offline errors all mean the same to the user
        reason = _root_cause(exc)
        raise DownloadError(
            f"Could not download {official.relpath} from {REPO_ID}@{revision} ({reason}). "
            + manual_instructions(model_dir)
        ) from None


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (huggingface_hub wraps the network error in generic ones)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}".rstrip(": ")

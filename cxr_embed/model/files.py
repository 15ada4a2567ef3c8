"""Where model folders live and what is in them (the official MedImageInsight layout).

A model folder holds ``config.yaml``, ``vision_model/medimageinsigt-v1.0.0.pt`` (a safetensors file
despite the suffix; "insigt" is the official spelling) and ``language_model/clip_tokenizer_4.16.2/``.
It is found from an explicit option, then ``$CXR_EMBED_MODEL_DIR``, then the ``cxr-embed model pull``
cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import ModelNotFoundError

CONFIG_NAME = "config.yaml"
CHECKPOINT_RELPATH = "vision_model/medimageinsigt-v1.0.0.pt"
TOKENIZER_RELPATH = "language_model/clip_tokenizer_4.16.2"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

MODEL_DIR_ENV = "CXR_EMBED_MODEL_DIR"
CACHE_DIR_ENV = "CXR_EMBED_CACHE_DIR"
#: Folder of the official files inside the Hugging Face repository (and inside the pull cache).
OFFICIAL_SUBFOLDER = "2024.09.27"

#: Files smaller than this are hashed on every load; bigger ones (the 2.5 GB checkpoint) are cached.
_HASH_CACHE_MIN_BYTES = 64 * 2**20


def cache_dir() -> Path:
    """cxr-embed's cache folder: ``$CXR_EMBED_CACHE_DIR`` or the platform user cache dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cxr-embed"))


def pull_dir() -> Path:
    """Where ``cxr-embed model pull`` puts the official folder by default."""
    return cache_dir() / "models" / "lion-ai--MedImageInsights"


def pulled_model_dir() -> Path:
    """The model folder inside the pull cache (it mirrors the repository's ``2024.09.27/``)."""
    return pull_dir() / OFFICIAL_SUBFOLDER


def tiny_model_dir() -> Path:
    """The tiny parity model shipped with the package (official layout, 2.4 M parameters).

    Its outputs equal the official code's on the reference inputs; tests, the demo and the
    benchmarks use it so that nothing needs the 2.5 GB download.
    """
    return Path(str(resources.files("cxr_embed").joinpath("assets", "tiny-model")))


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """Pick the model folder: ``model_dir`` > ``$CXR_EMBED_MODEL_DIR`` > the pull cache."""
    layout = f"{CONFIG_NAME}, {CHECKPOINT_RELPATH} and {TOKENIZER_RELPATH}/"
    if model_dir is not None:
        path, origin = Path(model_dir).expanduser(), "--model-dir"
    elif os.environ.get(MODEL_DIR_ENV):
        path, origin = Path(os.environ[MODEL_DIR_ENV]).expanduser(), f"${MODEL_DIR_ENV}"
    else:
        path = pulled_model_dir()
        if (path / CONFIG_NAME).is_file():
            return path
        raise ModelNotFoundError(
            "No MedImageInsight model found. Run `cxr-embed model pull` to download the official weights "
            f"(2.5 GB), or pass --model-dir (or set ${MODEL_DIR_ENV}) to a folder holding {layout}."
        )
    if not (path / CONFIG_NAME).is_file():
        raise ModelNotFoundError(
            f"{path} (from {origin}) is not a MedImageInsight model folder: {CONFIG_NAME} is missing. "
            f"A model folder holds {layout}; `cxr-embed model pull` creates one."
        )
    return path


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file. Results for big files are cached by (path, size, mtime) in the cache dir."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "sha256.json"
    use_cache = stat.st_size >= _HASH_CACHE_MIN_BYTES
    cached: dict[str, str] = {}
    if use_cache and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        if key in cached:
            return cached[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 2**20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if use_cache:
        cached[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cached, cache_file)
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return value

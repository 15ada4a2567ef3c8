"""Model architecture settings read from an official MedImageInsight ``config.yaml``.

Only the keys that shape the network are read (``IMAGE_ENCODER.SPEC``, ``LANG_ENCODER``,
``UNICL_MODEL.DIM_PROJECTION`` and the image size/mean/std); the many training keys in the official
file are ignored. The same code therefore builds the 616 M-parameter official model and the small
parity fixture that ships with the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cxr_embed.errors import ConfigError

#: Size of the CLIP BPE vocabulary shipped with the model (``clip_tokenizer_4.16.2``).
CLIP_VOCAB_SIZE = 49408

FULL_CONFIG_ASSET = "medimageinsight-v1.0.0.yaml"


@dataclass(frozen=True)
class ImageEncoderConfig:
    """DaViT v1 settings (``IMAGE_ENCODER``)."""

    image_size: int
    patch_size: tuple[int, ...]
    patch_stride: tuple[int, ...]
    patch_padding: tuple[int, ...]
    patch_prenorm: tuple[bool, ...]
    dim_embed: tuple[int, ...]
    num_heads: tuple[int, ...]
    num_groups: tuple[int, ...]
    depths: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    drop_path_rate: float
    enable_checkpoint: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features (last stage width)."""
        return self.dim_embed[-1]


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP-style text transformer settings (``LANG_ENCODER``)."""

    context_length: int
    width: int
    heads: int
    layers: int
    vocab_size: int
    autoregressive: bool


@dataclass(frozen=True)
class UniCLConfig:
    """The whole model: both towers and the shared projection width."""

    name: str
    image: ImageEncoderConfig
    text: TextEncoderConfig
    dim_projection: int

    @property
    def slug(self) -> str:
        """A file-name-safe id from ``NAME`` without remarks in parentheses (``model_id`` of non-official models)."""
        return re.sub(r"[^a-z0-9.]+", "-", self.name.split("(")[0].lower()).strip("-") or "unnamed"


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"config.yaml has no '{key}' section; is this a MedImageInsight config?")
    return value


def _get(section: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in section:
        return section[key]
    if default is ...:
        raise ConfigError(f"config.yaml lacks {where}.{key}; is this a MedImageInsight config?")
    return default


def config_from_dict(raw: dict[str, Any]) -> UniCLConfig:
    """Build a :class:`UniCLConfig` from a parsed official config (mapping of upper-case keys)."""
    img = _section(raw, "IMAGE_ENCODER")
    spec = _section(img, "SPEC")
    lang = _section(raw, "LANG_ENCODER")
    unicl = _section(raw, "UNICL_MODEL")
    if img.get("NAME", "davit_v1") != "davit_v1":
        raise ConfigError(f"IMAGE_ENCODER.NAME {img.get('NAME')!r} is not supported; only 'davit_v1' is.")
    if lang.get("TOKENIZER", "clip") != "clip":
        raise ConfigError(f"LANG_ENCODER.TOKENIZER {lang.get('TOKENIZER')!r} is not supported; only 'clip' is.")
    size = _get(img, "IMAGE_SIZE", "IMAGE_ENCODER")
    size = list(size) if isinstance(size, list | tuple) else [size, size]
    if len(set(size)) != 1:
        raise ConfigError(f"IMAGE_ENCODER.IMAGE_SIZE {size} is not square; only square inputs are supported.")

    def ints(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in _get(spec, key, "IMAGE_ENCODER.SPEC"))

    image = ImageEncoderConfig(
        image_size=int(size[0]),
        patch_size=ints("PATCH_SIZE"),
        patch_stride=ints("PATCH_STRIDE"),
        patch_padding=ints("PATCH_PADDING"),
        patch_prenorm=tuple(bool(v) for v in _get(spec, "PATCH_PRENORM", "IMAGE_ENCODER.SPEC")),
        dim_embed=ints("DIM_EMBED"),
        num_heads=ints("NUM_HEADS"),
        num_groups=ints("NUM_GROUPS"),
        depths=ints("DEPTHS"),
        window_size=int(_get(spec, "WINDOW_SIZE", "IMAGE_ENCODER.SPEC")),
        mlp_ratio=float(_get(spec, "MLP_RATIO", "IMAGE_ENCODER.SPEC", 4.0)),
        drop_path_rate=float(_get(spec, "DROP_PATH_RATE", "IMAGE_ENCODER.SPEC", 0.1)),
        enable_checkpoint=bool(_get(spec, "ENABLE_CHECKPOINT", "IMAGE_ENCODER.SPEC", False)),
        mean=tuple(float(v) for v in _get(img, "IMAGE_MEAN", "IMAGE_ENCODER", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in _get(img, "IMAGE_STD", "IMAGE_ENCODER", (0.229, 0.224, 0.225))),
    )
    n = len(image.dim_embed)
    lengths = {k: len(getattr(image, k)) for k in ("patch_size", "patch_stride", "patch_padding", "patch_prenorm",
                                                   "num_heads", "num_groups", "depths")}
    if any(v != n for v in lengths.values()):
        raise ConfigError(f"IMAGE_ENCODER.SPEC lists must all have {n} entries (one per stage); got {lengths}.")
    for d, h, g in zip(image.dim_embed, image.num_heads, image.num_groups, strict=True):
        if d % h or d % g:
            raise ConfigError(f"IMAGE_ENCODER.SPEC: width {d} is not divisible by heads {h} / groups {g}.")
    text = TextEncoderConfig(
        context_length=int(_get(lang, "CONTEXT_LENGTH", "LANG_ENCODER")),
        width=int(_get(lang, "WIDTH", "LANG_ENCODER")),
        heads=int(_get(lang, "HEADS", "LANG_ENCODER")),
        layers=int(_get(lang, "LAYERS", "LANG_ENCODER")),
        vocab_size=int(_get(lang, "VOCAB_SIZE", "LANG_ENCODER", CLIP_VOCAB_SIZE)),
        autoregressive=bool(_get(lang, "AUTOGRESSIVE", "LANG_ENCODER", True)),
    )
    if text.width % text.heads:
        raise ConfigError(f"LANG_ENCODER.WIDTH {text.width} is not divisible by HEADS {text.heads}.")
    return UniCLConfig(
        name=str(raw.get("NAME", "unnamed")),
        image=image,
        text=text,
        dim_projection=int(_get(unicl, "DIM_PROJECTION", "UNICL_MODEL")),
    )


def load_config(path: str | Path) -> UniCLConfig:
    """Read and validate a model folder's ``config.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Model config not found: {path}. A model folder must contain config.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a YAML mapping; is it a MedImageInsight config.yaml?")
    return config_from_dict(raw)


def full_config() -> UniCLConfig:
    """The official MedImageInsight v1.0.0 architecture, available without downloading anything."""
    asset = resources.files("cxr_embed").joinpath("assets", FULL_CONFIG_ASSET)
    return config_from_dict(yaml.safe_load(asset.read_text(encoding="utf-8")))

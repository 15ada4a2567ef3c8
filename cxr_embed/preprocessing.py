"""Image -> model tensor, identical to the official MedImageInsight eval path on 8-bit L/RGB images.

The official path: gray to 3 channels, Pillow bicubic resize of the **uint8** image to exactly
480x480 (aspect ratio not kept, no crop; Pillow antialiases when shrinking and rounds back to 8 bits),
divide by 255, normalise with the ImageNet mean/std. Any other resize (torch bicubic on floats,
aspect-preserving crop …) moves the embeddings by 1e-3 or more, so this module does exactly that and
nothing else. Modes other than L/LA/RGB are first brought to L/RGB by the documented policy in
:func:`cxr_embed.imageio.to_model_mode` (16-bit windowing, alpha, palette, CMYK, float …).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

#: Bumped whenever the pixel policy changes in a way that changes tensors (part of the fingerprint,
#: so a store never mixes embeddings made under different policies).
POLICY_VERSION = 1

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocessor:
    """Callable turning a PIL image into a (3, S, S) float32 tensor, reference-exact on 8-bit L/RGB.

    Split in two halves for pipelines: :meth:`to_uint8` (decode workers) and :meth:`normalize` (on the
    model's device); ``__call__`` is their composition.
    """

    image_size: int = 480
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    def resize(self, img: Image.Image) -> np.ndarray:
        """The uint8 (S, S, 3) array after the mode policy and the Pillow resize."""
        if img.mode == "LA":  # the reference drops alpha without compositing
            img = img.convert("L")
        elif img.mode not in ("L", "RGB"):
            from cxr_embed.imageio import to_model_mode

            img = to_model_mode(img)
        # Resizing L and then copying to 3 channels equals the reference's convert('RGB') + resize.
        size = (self.image_size, self.image_size)
        arr = np.asarray(img.resize(size, _INTERPOLATIONS[self.interpolation]), dtype=np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """The (3, S, S) uint8 tensor after :meth:`resize`: what decode workers send (a quarter of float32).

        The float conversion and normalisation are left to :meth:`normalize`, which runs where the model
        runs (GPU or CPU), so worker → main-process traffic and host → device copies stay 8-bit.
        """
        return torch.from_numpy(np.ascontiguousarray(self.resize(img).transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) on any device → float32 model input: ``/ 255``, ``- mean``, ``/ std``.

        The one place the reference's float32 operation order lives: elementwise and in that order, so
        a batch normalised at once on CPU is bitwise equal to images normalised one by one.
        """
        x = pixels.float().div(255)
        mean, std = _mean_std(self.mean, self.std, x.device)
        return x.sub_(mean).div_(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img))

    def fingerprint(self) -> str:
        """Stable hash of the settings and both pixel policies (decode + resize); stores refuse to mix them."""
        from cxr_embed.imageio import POLICY_VERSION as DECODE_POLICY_VERSION

        payload = json.dumps(
            {
                **asdict(self),
                "policy_version": POLICY_VERSION,
                "decode_policy_version": DECODE_POLICY_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std on ``device``, made once: a fresh host→device copy per batch would
    wait for the GPU's queued work and stall the pipeline."""
    with torch.inference_mode(False):  # ordinary tensors, usable inside and outside inference mode
        return (
            torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None],
            torch.tensor(std, dtype=torch.float32, device=device)[:, None, None],
        )

"""MedImageInsight (DaViT image tower + CLIP-style text tower), reimplemented to match the official
embeddings exactly and loaded strictly from safetensors. Consumers use :class:`MedImageInsight`."""

from cxr_embed.model.files import resolve_model_dir, tiny_model_dir
from cxr_embed.model.medimageinsight import MedImageInsight

__all__ = ["MedImageInsight", "resolve_model_dir", "tiny_model_dir"]

"""The bundled 8x8 digits enlarged for the convolutional GAN examples (no download)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from examples.data import digits


def digits_images(
    split: str = "train", size: int = 16, eval_fraction: float = 0.15, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``examples.data.digits`` enlarged to ``size`` x ``size`` by bilinear interpolation, in
    [0, 1], as ``{"data": (N, 1, size, size), "labels": (N,)}``: a size that halves twice
    suits a DCGAN's strided convolutions (8x8 leaves too little room)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    data = digits(split, eval_fraction, seed)
    images = data["data"]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return {"data": images.clamp(0, 1).contiguous(), "labels": data["labels"]}

"""Small data sets that need no download: scikit-learn's bundled 8x8 digits, and noise."""

from __future__ import annotations

import torch


def digits(
    split: str = "train", eval_fraction: float = 0.15, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The 1,797 handwritten 8x8 digits that ship inside scikit-learn, scaled to [0, 1], as
    ``{"data": (N, 1, 8, 8), "labels": (N,)}``; a fixed shuffle splits train from eval."""
    from sklearn.datasets import load_digits  # the examples extra; not a core dependency

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = int(len(images) * (1 - eval_fraction))
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    index = order[:cut] if split == "train" else order[cut:]
    return {"data": images[index], "labels": labels[index]}


def noise(
    num_samples: int = 1024, shape: tuple[int, ...] = (1, 4, 4), seed: int = 0
) -> dict[str, torch.Tensor]:
    """Uniform noise in [0, 1] shaped like images: a workload where the loop's overhead shows."""
    generator = torch.Generator().manual_seed(seed)
    return {"data": torch.rand((num_samples, *shape), generator=generator)}

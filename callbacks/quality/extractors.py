"""Feature extractors for FID and KID: the protocol, a small fixed network, and InceptionV3.

An extractor is any callable taking images (N, C, H, W) in [0, 1] and returning features
(N, D); ``check_features`` refuses anything else, naming the shape it got.

* ``RandomConvFeatures``: three convolutions with fixed random weights (drawn from a seed, never
  trained, no file), global average and max pooling. Deterministic and quick on a CPU: for
  tests, examples and comparisons within one project; its values are not comparable with
  published (Inception) FIDs.
* ``InceptionV3Features(weights_path=...)``: the FID network of the literature, torch-fidelity's
  TensorFlow-compatible InceptionV3 (2048-d pool features), with weights from a file the user has
  downloaded once; nothing is downloaded at run time. torch-fidelity is an optional package
  (``pip install torch-fidelity``; it also needs torchvision matching the installed torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from engine.errors import ConfigError

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


@runtime_checkable
class Extractor(Protocol):
    """Images (N, C, H, W) in [0, 1] -> features (N, D)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def check_features(features: Any, count: int, extractor: Any) -> torch.Tensor:
    """``features`` if it is an (``count``, D) floating tensor, else a ConfigError naming the
    shape and the extractor."""
    name = getattr(extractor, "__name__", type(extractor).__name__)
    if not isinstance(features, torch.Tensor):
        raise ConfigError(
            f"feature extractor {name} returned a {type(features).__name__}; it must return a "
            f"tensor of shape (N, D) = ({count}, D)"
        )
    shape = tuple(features.shape)
    if features.ndim != 2 or shape[0] != count or shape[1] < 1:
        raise ConfigError(
            f"feature extractor {name} returned shape {shape} for {count} images; it must "
            f"return (N, D) = ({count}, D)"
        )
    if not features.is_floating_point():
        raise ConfigError(f"feature extractor {name} returned {features.dtype} features")
    return features


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.mean(1, keepdim=True)
    raise ConfigError(f"can not feed {have}-channel images to a {channels}-channel extractor")


class RandomConvFeatures(nn.Module):
    """Fixed random convolutional features (see the module docstring): images are resized to
    ``size`` x ``size`` and given ``channels`` channels (gray repeated, colour averaged), then
    three 3x3 convolutions with ReLU (two average-poolings between) give ``dim / 2`` maps,
    pooled by their mean and their maximum into ``dim`` features."""

    def __init__(self, channels: int = 1, dim: int = 64, size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"dim must be an even integer >= 2, got {dim!r}")
        self.channels, self.dim, self.size = channels, dim, size
        generator = torch.Generator().manual_seed(seed)
        widths = [channels, 32, 64, dim // 2]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:])
        )
        with torch.no_grad():
            for conv in self.convs:
                assert isinstance(conv, nn.Conv2d)
                fan_in = conv.in_channels * 9
                scale = (2.0 / fan_in) ** 0.5
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
                assert conv.bias is not None
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _match_channels(images.float(), self.channels)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if index < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2)
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


class InceptionV3Features:
    """torch-fidelity's InceptionV3 (2048-d features), weights loaded from ``weights_path``.

    Fails at construction, naming what to do, when the file is missing or torch-fidelity can
    not be imported. Images in [0, 1] are quantised to uint8 and gray ones repeated to RGB, as
    the reference implementation expects."""

    def __init__(self, weights_path: str | Path | None = None, feature: str = "2048") -> None:
        if weights_path is None or not Path(weights_path).is_file():
            raise ConfigError(
                f"InceptionV3Features needs the InceptionV3 FID weights as a file; "
                f"weights_path={None if weights_path is None else str(weights_path)!r} "
                f"{'is not set' if weights_path is None else 'does not exist'}. Download it once "
                f"from {INCEPTION_WEIGHTS_URL} and pass its path as weights_path (in a config: "
                "extractor_args = {weights_path = '...'}); nothing is downloaded at run time. "
                "Or use extractor='random_conv' for a quick in-project measure"
            )
        try:
            module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        except ImportError as error:
            raise ConfigError(
                f"InceptionV3Features needs the optional package torch-fidelity ({error}); "
                "install it with: pip install torch-fidelity (it needs torchvision built for "
                f"torch {torch.__version__})"
            ) from None
        self.feature = feature
        self.network = module.FeatureExtractorInceptionV3(
            "inception-v3-compat", [feature], feature_extractor_weights_path=str(weights_path)
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        network = self.network.to(images.device)
        pixels = (_match_channels(images.float(), 3).clamp(0, 1) * 255).round().to(torch.uint8)
        with torch.no_grad():
            output = network(pixels)
        features = output[0] if isinstance(output, (tuple, list)) else output
        return features.reshape(len(images), -1).float()


BUILT_IN: dict[str, Callable[..., Any]] = {
    "random_conv": RandomConvFeatures,
    "inception_v3": InceptionV3Features,
}


def build_extractor(choice: Any, args: Mapping[str, Any] | None = None) -> Extractor:
    """An extractor from ``choice``: a callable is used as it is; a name of ``BUILT_IN`` or an
    import path ``"package.module:factory"`` is called with ``args``."""
    args = dict(args or {})
    if isinstance(choice, str):
        if choice in BUILT_IN:
            factory = BUILT_IN[choice]
        elif ":" in choice:
            from engine.config.file import import_object

            factory = import_object("extractor", choice)
        else:
            raise ConfigError(
                f"extractor {choice!r} is not one of {sorted(BUILT_IN)} nor an import path "
                "'package.module:factory'"
            )
        made = factory(**args)
    else:
        if args:
            raise ConfigError(f"extractor_args {sorted(args)} are for an extractor given by name")
        made = choice
    if not callable(made):
        raise ConfigError(f"extractor {choice!r} is not callable: got {type(made).__name__}")
    if isinstance(made, nn.Module):
        made.requires_grad_(False)
        made.eval()
    return made  # type: ignore[no-any-return]

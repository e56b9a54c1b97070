"""Quality metrics of generated images in the loop: FID and KID from streamed features."""

from callbacks.quality.callback import QUALITY_PRIORITY, QualityMetrics
from callbacks.quality.extractors import (
    Extractor,
    InceptionV3Features,
    RandomConvFeatures,
    build_extractor,
    check_features,
)
from callbacks.quality.statistics import (
    FeatureReservoir,
    FeatureStatistics,
    fid_from_statistics,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2,
)

__all__ = [
    "QUALITY_PRIORITY",
    "Extractor",
    "FeatureReservoir",
    "FeatureStatistics",
    "InceptionV3Features",
    "QualityMetrics",
    "RandomConvFeatures",
    "build_extractor",
    "check_features",
    "fid_from_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "polynomial_mmd2",
]

"""FID and KID from streamed features: fixed-size running statistics, never a feature list.

``FeatureStatistics`` keeps the count, the sum and the sum of outer products of every feature
vector it is shown, in float64: (D + D^2) numbers whatever the number of samples; the mean and
covariance come from them, and a sum over ranks merges ranks exactly. ``FeatureReservoir`` keeps
a uniform random sample of at most ``capacity`` feature vectors (Vitter's algorithm R, from its
own seeded generator), the bounded memory KID's kernel estimate needs.

``frechet_distance`` is FID's formula ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``
with the trace of the matrix square root taken as the sum of the square roots of the eigenvalues
of the symmetric ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues as ``S1 S2``), in float64: no
complex parts to drop, unlike ``scipy.linalg.sqrtm``. ``kernel_inception_distance`` is the
unbiased MMD^2 estimate with the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``
(Binkowski et al. 2018), averaged over random subsets as torch-fidelity does.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.distributed.collectives import World, sum_over_ranks


class FeatureStatistics:
    """Count, sum and sum of outer products of (N, D) feature batches, in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = int(dim)
        self.count = 0
        self.total = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Forget every sample; the buffers are reused, not reallocated."""
        self.count = 0
        self.total.zero_()
        self.outer.zero_()

    def add(self, features: torch.Tensor) -> None:
        values = features.detach().to(self.total.device, torch.float64)
        self.count += int(values.shape[0])
        self.total += values.sum(0)
        self.outer.addmm_(values.t(), values)

    def merge_over_ranks(self, world: World) -> None:
        """Replace these sums by their sums over every rank (one all-reduce)."""
        if not world.is_distributed:
            return
        flat = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=torch.float64, device=self.total.device),
                self.total,
                self.outer.flatten(),
            ]
        )
        summed = sum_over_ranks(flat, world)
        self.count = round(float(summed[0]))
        self.total.copy_(summed[1 : 1 + self.dim])
        self.outer.copy_(summed[1 + self.dim :].view(self.dim, self.dim))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance (divides by N - 1), as numpy's ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mean = self.mean
        return (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)

    @property
    def nbytes(self) -> int:
        return self.total.numel() * 8 + self.outer.numel() * 8


class FeatureReservoir:
    """A uniform sample of at most ``capacity`` of the feature vectors streamed through ``add``
    (algorithm R), drawn from a generator seeded with ``seed`` at each ``reset``."""

    def __init__(self, capacity: int, dim: int, seed: int = 0, device: Any = "cpu") -> None:
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.seed = seed
        self.features = torch.zeros(self.capacity, self.dim, dtype=torch.float32, device=device)
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        self.seen = 0
        self._generator.manual_seed(self.seed)

    def add(self, features: torch.Tensor) -> None:
        values = features.detach().to(self.features.device, torch.float32)
        count = int(values.shape[0])
        free = max(0, min(self.capacity - self.seen, count))
        if free:
            self.features[self.seen : self.seen + free] = values[:free]
        if free < count:
            positions = torch.arange(self.seen + free, self.seen + count, dtype=torch.float64)
            draws = torch.rand(count - free, generator=self._generator, dtype=torch.float64)
            slots = (draws * (positions + 1)).floor().long()
            for index in torch.nonzero(slots < self.capacity).flatten().tolist():
                self.features[int(slots[index])] = values[free + index]
        self.seen += count

    @property
    def held(self) -> torch.Tensor:
        """The sampled features, (min(seen, capacity), D)."""
        return self.features[: min(self.seen, self.capacity)]

    def gathered(self, world: World) -> torch.Tensor:
        """Every rank's sample, concatenated in rank order (the same on every rank)."""
        if not world.is_distributed:
            return self.held
        held = self.held
        block = torch.zeros(
            world.world_size, self.capacity, self.dim, dtype=torch.float32, device=held.device
        )
        block[world.rank, : len(held)] = held
        counts = torch.zeros(world.world_size, dtype=torch.float32, device=held.device)
        counts[world.rank] = len(held)
        block = sum_over_ranks(block, world)
        counts = sum_over_ranks(counts, world)
        return torch.cat([block[rank, : int(n)] for rank, n in enumerate(counts.tolist())])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * 4


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.t()


def trace_sqrt_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``tr((first @ second)^(1/2))`` for symmetric positive semi-definite matrices, from the
    eigenvalues of the symmetric ``first^(1/2) second first^(1/2)``, in float64."""
    first, second = first.double().cpu(), second.double().cpu()
    root = _psd_sqrt(first)
    middle = root @ second @ root
    middle = (middle + middle.t()) / 2
    return torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()


def frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """FID between two Gaussians (float64)."""
    mean1, mean2 = mean1.double().cpu(), mean2.double().cpu()
    cov1, cov2 = cov1.double().cpu(), cov2.double().cpu()
    diff = mean1 - mean2
    value = diff @ diff + cov1.trace() + cov2.trace() - 2 * trace_sqrt_product(cov1, cov2)
    return float(value)


def fid_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    if real.dim != fake.dim:
        raise ValueError(f"feature sizes differ: {real.dim} (reference) vs {fake.dim}")
    return frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)


def polynomial_mmd2(first: torch.Tensor, second: torch.Tensor) -> float:
    """The unbiased MMD^2 of two equal-size samples with ``k(x, y) = (x.y / D + 1)^3``."""
    x, y = first.double(), second.double()
    m, dim = x.shape
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"two samples of equal size >= 2 are needed, got {m} and {y.shape[0]}")
    k_xx = (x @ x.t() / dim + 1) ** 3
    k_yy = (y @ y.t() / dim + 1) ** 3
    k_xy = (x @ y.t() / dim + 1) ** 3
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of ``polynomial_mmd2`` over ``subsets`` random subsets of
    ``min(subset_size, len(real), len(fake))`` samples of each (drawn from ``seed``)."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 features on each side, got {len(real)} reference and "
            f"{len(fake)} generated"
        )
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        first = torch.randperm(len(real), generator=generator)[:size].to(real.device)
        second = torch.randperm(len(fake), generator=generator)[:size].to(fake.device)
        values.append(polynomial_mmd2(real[first], fake[second]))
    result = torch.tensor(values, dtype=torch.float64)
    std = float(result.std(unbiased=False)) if len(values) > 1 else 0.0
    return float(result.mean()), std

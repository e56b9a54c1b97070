"""callbacks/quality: FID and KID equal reference computations, stay in bounded memory, merge
across ranks, and serve as the monitor of checkpoints and early stopping."""

from __future__ import annotations

import gc
import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from callbacks import EMA, Checkpointing, EarlyStopping, QualityMetrics
from callbacks.quality import (
    FeatureReservoir,
    FeatureStatistics,
    InceptionV3Features,
    RandomConvFeatures,
    check_features,
    fid_from_statistics,
    kernel_inception_distance,
)
from engine import ConfigError, Engine, EngineConfig, OptimizerSpec, RunState, World
from strategies import Standard
from tests.helpers import run_state_of

# ----------------------------------------------------------------------------- references


def scipy_fid(first: np.ndarray, second: np.ndarray) -> float:
    """FID as the literature computes it (pytorch-fid): ``scipy.linalg.sqrtm`` of S1 S2."""
    mu1, mu2 = first.mean(0), second.mean(0)
    s1, s2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, written out term by term."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / d + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def digit_like(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Smooth random images in [0, 1], (n, 1, 8, 8)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=generator)
    images = nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    return (images + shift).clamp(0, 1)


def streamed(features: torch.Tensor, cuts: list[int]) -> FeatureStatistics:
    stats = FeatureStatistics(features.shape[1])
    edges = [0, *sorted(c % (len(features) + 1) for c in cuts), len(features)]
    for start, end in zip(edges[:-1], edges[1:]):
        if end > start:
            stats.add(features[start:end])
    return stats


# ----------------------------------------------------------------------------- FID


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 1000),
    shift=st.floats(0.0, 0.3),
    cuts=st.lists(st.integers(0, 400), max_size=4),
)
def test_fid_of_streamed_features_equals_scipy_on_the_same_features(
    seed: int, shift: float, cuts: list[int]
) -> None:
    extractor = RandomConvFeatures(channels=1, dim=32, size=16, seed=1)
    with torch.no_grad():
        real = extractor(digit_like(300, seed))
        fake = extractor(digit_like(250, seed + 1, shift))
    ours = fid_from_statistics(streamed(real, cuts), streamed(fake, cuts[::-1]))
    reference = scipy_fid(real.double().numpy(), fake.double().numpy())
    assert ours == pytest.approx(reference, abs=1e-3, rel=1e-4)


def test_fid_is_zero_for_the_same_features_and_grows_with_a_shift() -> None:
    features = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    same = fid_from_statistics(streamed(features, [100]), streamed(features, [250]))
    assert abs(same) < 1e-9
    shifted = fid_from_statistics(streamed(features, []), streamed(features + 0.5, []))
    assert shifted == pytest.approx(8 * 0.25, rel=1e-9)  # |mu1 - mu2|^2, equal covariances


# ----------------------------------------------------------------------------- KID


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1000), m=st.integers(2, 12), dim=st.integers(1, 6))
def test_kid_of_whole_sets_equals_the_direct_mmd(seed: int, m: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(m, dim, generator=generator, dtype=torch.float64) + 0.3
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=m)
    assert mean == pytest.approx(direct_mmd2(x.numpy(), y.numpy()), rel=1e-9, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_over_subsets_averages_the_direct_mmd_of_the_same_subsets() -> None:
    extractor = RandomConvFeatures(channels=1, dim=16, size=8, seed=3)
    with torch.no_grad():
        real = extractor(digit_like(40, 0)).double()
        fake = extractor(digit_like(30, 1, 0.2)).double()
    mean, std = kernel_inception_distance(real, fake, subsets=4, subset_size=10, seed=7)
    generator = torch.Generator().manual_seed(7)
    values = []
    for _ in range(4):
        first = torch.randperm(40, generator=generator)[:10]
        second = torch.randperm(30, generator=generator)[:10]
        values.append(direct_mmd2(real[first].numpy(), fake[second].numpy()))
    assert mean == pytest.approx(float(np.mean(values)), abs=1e-3)
    assert std == pytest.approx(float(np.std(values)), abs=1e-3)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    capacity=st.integers(1, 20),
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
)
def test_the_reservoir_keeps_a_bounded_sample_of_distinct_streamed_rows(
    capacity: int, sizes: list[int]
) -> None:
    reservoir = FeatureReservoir(capacity, 2, seed=0)
    total = sum(sizes)
    rows = torch.arange(total, dtype=torch.float32).repeat(2, 1).t()
    start = 0
    for size in sizes:
        reservoir.add(rows[start : start + size])
        start += size
    held = reservoir.held
    assert len(held) == min(capacity, total) and reservoir.features.shape == (capacity, 2)
    values = held[:, 0].tolist()
    assert len(set(values)) == len(values) and set(values) <= set(range(total))
    if total <= capacity:
        assert values == list(range(total))


# ----------------------------------------------------------------------------- extractors


class Shaped:
    """An extractor returning what ``make(images)`` builds."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __call__(self, images: torch.Tensor) -> Any:
        return self.make(images)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: torch.zeros(len(x), 4, 1), r"shape \(5, 4, 1\) for 5 images"),
        (lambda x: torch.zeros(len(x) - 1, 4), r"shape \(4, 4\) for 5 images"),
        (lambda x: torch.zeros(len(x)), r"shape \(5,\) for 5 images"),
        (lambda x: [0.0] * len(x), "returned a list"),
    ],
)
def test_an_extractor_output_that_is_not_n_by_d_is_refused_naming_its_shape(
    make: Any, message: str
) -> None:
    extractor = Shaped(make)
    with pytest.raises(ConfigError, match=message):
        check_features(extractor(torch.zeros(5, 1, 8, 8)), 5, extractor)
    quality = QualityMetrics(reference=digit_like(8, 0), extractor=extractor, num_samples=4)
    model = Generator()
    with pytest.raises(ConfigError, match="feature extractor Shaped returned"):
        quality.measure(run_state(model))


def test_inception_without_its_weights_file_fails_at_construction_naming_the_download(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"weights-inception-2015-12-05.*weights_path"):
        InceptionV3Features(weights_path=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="is not set"):
        QualityMetrics(reference=digit_like(8, 0), extractor="inception_v3")


def test_inception_without_torch_fidelity_says_how_to_install_it(tmp_path: Path) -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch-fidelity is installed here")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="pip install torch-fidelity"):
        InceptionV3Features(weights_path=weights)


def test_an_unknown_extractor_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="'vgg'"):
        QualityMetrics(reference=digit_like(8, 0), extractor="vgg")


# ----------------------------------------------------------------------------- the callback


class Generator(nn.Module):
    """``sample(noise)``: a linear map of 4-d noise to 8x8 images; ``loss`` pulls its bias."""

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 64)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(noise)).view(-1, 1, 8, 8)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.sample(torch.randn(len(x), 4)) - x).pow(2).mean()}


def run_state(model: nn.Module, world: World | None = None) -> RunState:
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.1)), EngineConfig(output_dir=None))
    run = run_state_of(engine, model)
    if world is not None:
        from engine.context import StepContext

        run.context = StepContext(
            device=torch.device("cpu"),
            precision="fp32",
            autocast=lambda: None,
            scaler=None,
            grad_clip_norm=None,
            nonfinite="raise",
            progress=run.progress,
            world=world,
        )
    return run


def test_the_callback_equals_fid_and_kid_of_the_same_generated_images() -> None:
    torch.manual_seed(0)
    model = Generator()
    reference = digit_like(60, 5)
    quality = QualityMetrics(
        reference={"data": reference},
        extractor=RandomConvFeatures(channels=1, dim=16, size=8),
        num_samples=50,
        batch_size=16,
        kid_reservoir=1000,
        kid_subsets=1,
        kid_subset_size=1000,
    )
    metrics = quality.measure(run_state(model))
    extractor = RandomConvFeatures(channels=1, dim=16, size=8)
    with torch.no_grad():
        noise = torch.cat(
            [
                torch.randn((min(16, 50 - s), 4), generator=torch.Generator().manual_seed(b))
                for b, s in enumerate(range(0, 50, 16))
            ]
        )
        fake = extractor(model.sample(noise)).double().numpy()
        real = extractor(reference).double().numpy()
    assert metrics["eval/fid"] == pytest.approx(scipy_fid(real, fake), abs=1e-3)
    size = 50
    generator = torch.Generator().manual_seed(0)
    first = torch.randperm(60, generator=generator)[:size].numpy()
    second = torch.randperm(50, generator=generator)[:size].numpy()
    assert metrics["eval/kid"] == pytest.approx(
        direct_mmd2(real[first], fake[second]), rel=1e-5, abs=1e-9
    )


def tensor_count() -> int:
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_memory_is_flat_over_100_evaluations() -> None:
    torch.manual_seed(0)
    model = Generator()
    quality = QualityMetrics(
        reference=digit_like(64, 1),
        extractor=RandomConvFeatures(channels=1, dim=16, size=8),
        num_samples=96,
        batch_size=32,
        kid_reservoir=40,
        kid_subsets=2,
        kid_subset_size=20,
    )
    run = run_state(model)
    quality.measure(run)  # the first evaluation allocates the buffers and the reference
    gc.collect()
    tensors_before = tensor_count()
    held = quality._fake[0].nbytes + quality._fake[1].nbytes  # type: ignore[index]
    tracemalloc.start()
    quality.measure(run)
    gc.collect()
    after_one, _ = tracemalloc.get_traced_memory()
    for _ in range(99):
        quality.measure(run)
    gc.collect()
    after_hundred, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tensor_count() == tensors_before
    assert quality._fake[0].nbytes + quality._fake[1].nbytes == held  # type: ignore[index]
    assert held == (16 + 16 * 16) * 8 + 40 * 16 * 4  # sums in float64, 40 reservoir rows
    assert after_hundred - after_one < 64 * 1024  # Python-side growth over 99 evaluations


def fit_with(
    callbacks: list[Any], tmp_path: Path | None, epochs: int, eval: Any = None, **extra: Any
) -> Any:
    torch.manual_seed(0)
    model = Generator()
    data = {"data": digit_like(32, 2)}
    config = EngineConfig(
        epochs=epochs,
        batch_size=8,
        device="cpu",
        output_dir=tmp_path,
        run_name="run",
        **extra,
    )
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.5)), config, callbacks)
    return model, engine.fit(model, data, eval=eval)


def small_quality(**extra: Any) -> QualityMetrics:
    values: dict[str, Any] = {
        "reference": digit_like(48, 3),
        "extractor": RandomConvFeatures(channels=1, dim=16, size=8),
        "num_samples": 32,
        "batch_size": 16,
        "kid_reservoir": 32,
        "kid_subsets": 2,
        "kid_subset_size": 16,
    }
    values.update(extra)
    return QualityMetrics(**values)


@pytest.mark.parametrize("with_eval_data", [False, True])
def test_fid_is_the_monitor_of_best_checkpoints_early_stopping_and_the_run(
    tmp_path: Path, with_eval_data: bool
) -> None:
    """Also with eval data, whose metrics the engine has before the FID exists."""
    stopper = EarlyStopping(monitor="eval/fid", patience=100)
    checkpoints = Checkpointing(monitor="eval/fid", mode="min", durable=False)
    eval = {"data": digit_like(16, 4)} if with_eval_data else None
    _, result = fit_with(
        [small_quality(), checkpoints, stopper], tmp_path, 4, eval, monitor="eval/fid"
    )
    values = [record["eval/fid"] for record in result.history]
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    best = min(values)
    assert stopper.best == best and checkpoints.best_value == best
    assert result.best_value == best and result.best_epoch == values.index(best)
    assert (result.run_dir / "model_best.pt").is_file()


def test_with_an_ema_in_the_run_the_ema_weights_are_measured() -> None:
    ema = EMA(decay=0.5)
    quality = small_quality()
    model, result = fit_with([ema, quality], None, epochs=1)
    with ema.applied():
        expected = small_quality().measure(run_state(model))
    raw = small_quality(ema=False).measure(run_state(model))
    assert result.history[-1]["eval/fid"] == pytest.approx(expected["eval/fid"], rel=1e-9)
    assert raw["eval/fid"] != pytest.approx(expected["eval/fid"], rel=1e-6)


def test_measuring_changes_no_random_stream_and_no_weight() -> None:
    model = Generator()
    quality = small_quality()
    run = run_state(model)
    state = torch.random.get_rng_state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = quality.measure(run)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert quality.measure(run) == first  # the same noise at every evaluation


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="needs reference images"):
        QualityMetrics()
    with pytest.raises(ConfigError, match=r"N >= 2, got \(1, 1, 8, 8\)"):
        QualityMetrics(reference=digit_like(1, 0))
    with pytest.raises(ConfigError, match="num_samples must be a positive integer"):
        small_quality(num_samples=0)
    with pytest.raises(ConfigError, match="source must be one of"):
        small_quality(source="noise")


# ----------------------------------------------------------------------------- two ranks


def _rank_entry(rank: int, port: int, folder: str) -> None:
    from engine.distributed.session import process_group
    from tests.helpers import set_rank_environment

    set_rank_environment(rank, 2, port)
    with process_group("cpu", 60.0) as world:
        torch.manual_seed(0)
        quality = small_quality(num_samples=48, kid_reservoir=64, kid_subsets=1, kid_subset_size=64)
        metrics = quality.measure(run_state(Generator(), world))
    torch.save(metrics, Path(folder) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_measure_what_one_process_measures(tmp_path: Path) -> None:
    from tests.helpers import free_port

    mp.start_processes(
        _rank_entry, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    alone = small_quality(
        num_samples=48, kid_reservoir=64, kid_subsets=1, kid_subset_size=64
    ).measure(run_state(Generator()))
    assert ranks[0] == ranks[1]
    for key, value in alone.items():
        if key != "eval/kid_std":
            assert ranks[0][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key

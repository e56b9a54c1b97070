"""`make demo`: train a small VAE on scikit-learn's bundled digits and show what the run wrote."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks import ConsoleMetrics, MetricsHistory, ProgressBar
from engine import Engine, EngineConfig, OptimizerSpec, SchedulerSpec
from examples.data import digits
from examples.models import VAE
from strategies import Standard


def main() -> None:
    engine = Engine(
        strategy=Standard(
            OptimizerSpec("Adam", lr=2e-3),
            scheduler=SchedulerSpec("ReduceLROnPlateau", monitor="eval/loss", patience=2),
            metrics=("reconstruction_loss", "reg_loss"),
        ),
        config=EngineConfig(
            epochs=20, batch_size=64, seed=0, output_dir="runs", run_name="vae-digits", log_every=10
        ),
        callbacks=[ProgressBar(), ConsoleMetrics(), MetricsHistory()],
    )
    result = engine.fit(VAE(input_shape=(1, 8, 8), latent_dim=8), digits("train"), digits("eval"))
    print(f"\nbest {result.monitor} = {result.best_value:.3f} at epoch {result.best_epoch + 1}")
    print(f"run folder: {result.run_dir}")
    if result.run_dir is not None:
        for path in sorted(result.run_dir.rglob("*")):
            print(f"  {path.relative_to(result.run_dir)}")


if __name__ == "__main__":
    main()

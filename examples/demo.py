"""`make demo`: run the command line on example configs and show what each run wrote.

``python examples/demo.py`` trains the VAE of ``examples/configs/vae_digits.toml``;
``python examples/demo.py examples/configs/aae_digits.toml ...`` runs those configs, and
``python examples/demo.py all`` every config in ``examples/configs``. Each run is exactly
``strategy-engine fit CONFIG --threads 1``, which ends by printing the run folder and its files.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT = CONFIGS / "vae_digits.toml"


def main(argv: list[str]) -> int:
    from engine.cli.main import main as cli

    configs = [DEFAULT] if not argv else sorted(CONFIGS.glob("*.toml")) if argv == ["all"] else argv
    for config in configs:
        print(f"\n=== strategy-engine fit {config}")
        code = cli(["fit", str(config), "--threads", "1"])  # small MLPs: one thread is fastest
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv[1:]))

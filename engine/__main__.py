"""``python -m engine fit CONFIG.toml``: the command line of ``engine.cli``."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m engine fit CONFIG.toml``: the command line of ``engine.cli.main``."""

from engine.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())

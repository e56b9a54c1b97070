"""Which pythae this package reproduces, and the one place that imports it.

The faithful mode copies the update order of pythae 0.1.2's trainers line by line, and the
config mapping names 0.1.2's fields; another version may train differently, so it is refused
rather than half supported.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType

from engine.errors import ConfigError

SUPPORTED_VERSIONS = ("0.1.2",)


def check_pythae_version(found: str | None = None) -> str:
    """The installed pythae's version (or ``found``), refused unless it is supported."""
    if found is None:
        try:
            found = metadata.version("pythae")
        except metadata.PackageNotFoundError:
            raise ConfigError(
                "pythae is not installed; install the compat extra (pip install -e '.[compat]') "
                f"for pythae {' or '.join(SUPPORTED_VERSIONS)}"
            ) from None
    if found not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"pythae version {found!r} is not supported: strategies.pythae reproduces the "
            f"trainers of pythae {' or '.join(SUPPORTED_VERSIONS)}"
        )
    return found


def import_pythae() -> ModuleType:
    """The ``pythae`` package, once its version is checked."""
    check_pythae_version()
    import pythae

    return pythae

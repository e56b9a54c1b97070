"""Optional packages: import one, or fail with the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if it is missing, a ``ModuleNotFoundError`` tells the user to
    ``pip install 'strategy-engine[extra]'`` for ``feature``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"{feature} needs the optional package {module!r}, which is not installed "
            f"({error}); install it with: pip install 'strategy-engine[{extra}]'",
            name=module,
        ) from None

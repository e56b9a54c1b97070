"""How one batch updates the model: strategies composed from shared update parts."""

from strategies.standard import Standard
from strategies.update import Update, UpdateSpec

__all__ = ["Standard", "Update", "UpdateSpec"]

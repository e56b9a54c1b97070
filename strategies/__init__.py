"""How one batch updates the model: strategies composed from shared update parts."""

from strategies.adversarial import Adversarial
from strategies.coupled import Coupled
from strategies.coupled_adversarial import CoupledAdversarial
from strategies.standard import Standard
from strategies.update import Update, UpdateSpec

__all__ = ["Adversarial", "Coupled", "CoupledAdversarial", "Standard", "Update", "UpdateSpec"]

"""How one batch updates the model: strategies composed from shared update parts.

``strategies/joint.py`` says how a multi-loss strategy is composed (role-keyed records, the
shared ``JointUpdates`` part and methods); ``strategies/phases.py`` how a sequential one is
described (an ordered list of ``Phase`` records, with ``strategies/regularisers.py``'s
penalties as composable parts).
"""

from strategies.adaptive_weight import adaptive_weight
from strategies.adversarial import Adversarial
from strategies.coupled import Coupled
from strategies.coupled_adversarial import CoupledAdversarial
from strategies.phases import Phase
from strategies.regularisers import GradientPenalty, r1, r2, wgan_gp
from strategies.sequential import Sequential
from strategies.standard import Standard
from strategies.update import Update, UpdateSpec

__all__ = [
    "Adversarial",
    "Coupled",
    "CoupledAdversarial",
    "GradientPenalty",
    "Phase",
    "Sequential",
    "Standard",
    "Update",
    "UpdateSpec",
    "adaptive_weight",
    "r1",
    "r2",
    "wgan_gp",
]

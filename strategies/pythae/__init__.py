"""pythae's models trained by the engine as pythae's trainers train them, and back to pythae.

* ``from_pythae(model, training_config, train_data, eval_data, updates="isolated")``: a ready
  ``Engine`` with the strategy, settings and hooks pythae's ``TrainingPipeline`` would use
  (``strategies/pythae/run.py``; every config field's mapping: ``strategies/pythae/mapping.py``).
* ``SharedGraphUpdates``: pythae's own multi-optimiser updates, exactly (``updates="pythae"``).
* ``export_to_pythae(model, folder)``: a folder ``pythae.models.AutoModel`` loads.
* ``load_from_json(model_config_path, training_config_path)``: a model and training config from
  the JSON files pythae writes (what the CLI calls).

pythae is imported only when one of these is called, and its version is checked then.
"""

from strategies.pythae.export import export_to_pythae
from strategies.pythae.files import PythaeSetup, load_from_json
from strategies.pythae.forward import PythaeForward, update_model
from strategies.pythae.run import PythaeRun, from_pythae
from strategies.pythae.shared_graph import SharedGraphUpdates, backward_shared_graph
from strategies.pythae.version import SUPPORTED_VERSIONS, check_pythae_version

__all__ = [
    "SUPPORTED_VERSIONS",
    "PythaeForward",
    "PythaeRun",
    "PythaeSetup",
    "SharedGraphUpdates",
    "backward_shared_graph",
    "check_pythae_version",
    "export_to_pythae",
    "from_pythae",
    "load_from_json",
    "update_model",
]

"""The registry of pruning methods: importing this module registers every method, one flat file each.

`PRUNERS[name]` is the `Pruner` class `config.pruning_method=name` runs. To add a method, write `pruner_<name>.py`
(a `Pruner` subclass decorated with `register_pruner`), import it here, and add its name to
`configuration_llava_ivtp.PRUNING_METHODS` (a test checks the two agree).
"""

from __future__ import annotations

from .pruner_base import PRUNERS, Pruner, budget_schedule
from .pruner_cdpruner import CdPrunerPruner
from .pruner_divprune import DivPrunePruner
from .pruner_evit import EvitPruner
from .pruner_fastv import FastVPruner
from .pruner_ivtp import IvtpPruner
from .pruner_pdrop import PDropPruner
from .pruner_pooling import PoolingPruner
from .pruner_random import RandomPruner
from .pruner_tome import TomePlusPruner, TomePruner
from .pruner_topk import TopKPlusPruner, TopKPruner
from .pruner_visionzip import VisionZipPruner
from .pruner_vispruner import VisPrunerPruner


__all__ = [
    "PRUNERS", "Pruner", "budget_schedule", "CdPrunerPruner", "DivPrunePruner", "EvitPruner", "FastVPruner",
    "IvtpPruner", "PDropPruner", "PoolingPruner", "RandomPruner", "TomePlusPruner", "TomePruner", "TopKPlusPruner",
    "TopKPruner", "VisionZipPruner", "VisPrunerPruner",
]

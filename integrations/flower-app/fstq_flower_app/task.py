"""Model, data and local training: the reference loop's own client stage, one per process.

The app trains and evaluates with the workbench that ``fstq simulate`` runs in process
(:func:`fstqcodec.sim.client.make_workbench`: the classifier's :class:`~fstqcodec.sim.client.Workbench`,
or the causal LM's for the generative QA tasks ``drug-condition``, ``chatterbot-qa``
and ``chatterbot-xl``), built from
a :class:`fstqcodec.sim.config.SimConfig` read from the app's ``run_config``
(:func:`fstqcodec.sim.flower_engine.config_from_run_config`). Both engines therefore run the same
experiment: same split, partition, initial adapter, batches and dropout masks, and the same defaults.
"""

from __future__ import annotations

from functools import lru_cache

from fstqcodec.sim.client import Workbench, make_workbench
from fstqcodec.sim.config import SimConfig
from fstqcodec.sim.flower_engine import config_from_run_config

__all__ = ["config_from_run_config", "workbench"]


@lru_cache(maxsize=2)
def workbench(config: SimConfig) -> Workbench:
    """The process's workbench for ``config`` (built on first use; a causal LM's for a QA task).

    A Flower simulation runs each ClientApp call in a long-lived Ray actor; loading the model and
    tokenizing the corpus once per actor keeps a round to its training.
    """
    return make_workbench(config)

"""Pruning and sparse training for Dopamine's JAX agents with prunax.

Importing this package first applies the fixes dopamine-rl needs on current JAX and numpy
(:mod:`prunax_dopamine.compat`), then registers the gin configurables:
``prunax_dopamine.pruner``, ``prunax_dopamine.PrunedDQNAgent`` (and the Rainbow, Quantile
and Implicit Quantile variants) and ``prunax_dopamine.create_pruned_runner``.
"""

import os

from prunax_dopamine import compat

compat.apply()

from prunax_dopamine.agents import PrunedAgentMixin  # noqa: E402
from prunax_dopamine.agents import PrunedDQNAgent  # noqa: E402
from prunax_dopamine.agents import PrunedImplicitQuantileAgent  # noqa: E402
from prunax_dopamine.agents import PrunedQuantileAgent  # noqa: E402
from prunax_dopamine.agents import PrunedRainbowAgent  # noqa: E402
from prunax_dopamine.agents import pruner  # noqa: E402
from prunax_dopamine.runner import create_pruned_runner  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), 'configs')


def config_path(name: str) -> str:
  """Path of a gin config shipped with this package, e.g. ``config_path('dqn_cartpole.gin')``.

  Raises:
    ValueError: if no shipped config has that name.
  """
  path = os.path.join(CONFIG_DIR, name)
  if not os.path.isfile(path):
    raise ValueError(
      f'No shipped gin config {name!r}; valid names are {sorted(os.listdir(CONFIG_DIR))}.'
    )
  return path


__all__ = [
  'CONFIG_DIR',
  'PrunedAgentMixin',
  'PrunedDQNAgent',
  'PrunedImplicitQuantileAgent',
  'PrunedQuantileAgent',
  'PrunedRainbowAgent',
  'compat',
  'config_path',
  'create_pruned_runner',
  'pruner',
]

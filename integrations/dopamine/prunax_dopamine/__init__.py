"""Pruning and sparse training for Dopamine's JAX agents with prunax.

Importing this package patches nothing and imports no Dopamine module. The names that need
Dopamine, ``prunax_dopamine.pruner``, ``prunax_dopamine.PrunedDQNAgent`` (and the Rainbow,
Quantile and Implicit Quantile variants), ``PrunedAgentMixin`` and
``prunax_dopamine.create_pruned_runner``, are loaded on first access: that access first
calls :func:`prunax_dopamine.compat.apply` (the fixes dopamine-rl needs on current JAX and
numpy, each only when needed), then imports the agents and the runner, which registers the
gin configurables. ``python -m prunax_dopamine.run`` does the same.
"""

import importlib
import os

from prunax_dopamine import compat

CONFIG_DIR = os.path.join(os.path.dirname(__file__), 'configs')

# Names defined in modules that import Dopamine: loaded by __getattr__ after compat.apply().
_DOPAMINE_NAMES = {
  'PrunedAgentMixin': 'agents',
  'PrunedDQNAgent': 'agents',
  'PrunedImplicitQuantileAgent': 'agents',
  'PrunedQuantileAgent': 'agents',
  'PrunedRainbowAgent': 'agents',
  'pruner': 'agents',
  'create_pruned_runner': 'runner',
}


def __getattr__(name: str):
  if name not in _DOPAMINE_NAMES:
    raise AttributeError(f"module 'prunax_dopamine' has no attribute {name!r}")
  compat.apply()
  return getattr(importlib.import_module(f'prunax_dopamine.{_DOPAMINE_NAMES[name]}'), name)


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

"""jaxpruner's ``api`` module: ``create_updater_from_config`` returning the updaters of
:mod:`prunax.compat.jaxpruner` (jaxpruner's defaults), and the algorithm registry.

The config is read by :func:`prunax.create_updater_from_config` (same keys and names), with
jaxpruner's schedule rule: no ``update_start_step`` (or None) gives ``NoUpdateSchedule``
for pruning algorithms, ``update_start_step == update_end_step`` a ``OneShotSchedule``,
otherwise ``PolynomialSchedule`` (``PeriodicSchedule`` for SET/RigL), with jaxpruner's
step semantics (:mod:`prunax.compat.jaxpruner.sparsity_schedules`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from prunax import engines
from prunax import registry as _registry
from prunax import sparsity_distributions as _sd
from prunax import sparsity_types as _st
from prunax.compat.jaxpruner import algorithms
from prunax.compat.jaxpruner import base_updater
from prunax.compat.jaxpruner import sparsity_schedules
from prunax.compat.jaxpruner import sparsity_types
from prunax.compat.jaxpruner._classes import is_twin
from prunax.compat.jaxpruner._classes import twin_class
from prunax.registry import ALGORITHM_REGISTRY
from prunax.registry import all_algorithm_names

__all__ = [
  'ALGORITHM_REGISTRY',
  'all_algorithm_names',
  'create_updater_from_config',
  'register_algorithm',
]


def register_algorithm(name: str, cls: type, info: Any = None) -> None:
  """:func:`prunax.register_algorithm` that also takes jaxpruner-style classes derived
  from this namespace's (not frozen): their instances' class is registered."""
  _registry.register_algorithm(name, twin_class(cls), info)


def _compat_classes() -> dict[type, type]:
  """prunax class -> its jaxpruner-default class (the bases of the compat classes)."""
  classes = [base_updater.NoPruning] + [
    getattr(algorithms, name) for name in algorithms.__all__ if name[0].isupper()
  ]
  return {cls.__mro__[1]: cls for cls in classes}


def _schedule(updater: Any, cfg: dict[str, Any]) -> Any:
  start, end = cfg.get('update_start_step'), cfg.get('update_end_step')
  freq = cfg.get('update_freq', 10)
  kind = _registry.schedule_kind(type(updater))
  if kind == 'none':
    return sparsity_schedules.NoUpdateSchedule()
  if kind == 'periodic':
    return sparsity_schedules.PeriodicSchedule(freq, start or 0, end)
  if start is None:
    return sparsity_schedules.NoUpdateSchedule()
  if end is None or end == start:
    return sparsity_schedules.OneShotSchedule(start)
  return sparsity_schedules.PolynomialSchedule(freq, start, end, power=cfg.get('power', 3))


def create_updater_from_config(config: Any) -> Any:
  """An updater from a jaxpruner sparsity config (dict or ``ml_collections.ConfigDict``).

  Args:
    config: ``algorithm`` (one of ``all_algorithm_names()``), ``dist_type``, ``sparsity``,
      ``sparsity_type``, ``update_freq``, ``update_start_step``, ``update_end_step`` and
      further constructor arguments (see :func:`prunax.create_updater_from_config`).

  Returns:
    The algorithm's :mod:`prunax.compat.jaxpruner` class (jaxpruner's defaults) where it
    has one, else prunax's class.

  Raises:
    ValueError: an unknown algorithm, dist_type or sparsity type (the message lists the
      valid values).
  """
  cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  name = cfg.get('algorithm')
  if name not in ALGORITHM_REGISTRY:
    raise ValueError(
      f'Algorithm {name!r} is not registered; valid names (jaxpruner.all_algorithm_names()) '
      f'are {all_algorithm_names()}.'
    )
  nm_erk_target = None
  if 'sparsity_type' in cfg:
    try:
      stype = _st.from_string(cfg['sparsity_type'])
    except (ValueError, TypeError) as e:
      raise ValueError(f'Sparsity type {cfg["sparsity_type"]!r} is not supported: {e}') from None
    if isinstance(stype, _st.NByM):
      # jaxpruner: N:M ignores the target sparsity; under ERK, the leaves ERK keeps dense
      # stay dense (the compat updater's N:M rule, given the ERK target back below).
      if cfg.get('dist_type') == 'erk' and cfg.get('sparsity'):
        nm_erk_target = cfg['sparsity']
      if cfg.get('sparsity'):
        cfg['sparsity'] = stype.sparsity
      cfg['dist_type'] = 'uniform'
  if engines.trains_dense_weights(_registry.get_algorithm(name)) and cfg.get('skip_gradients'):
    warnings.warn(
      f'{name}: skip_gradients=True is ignored; STE recomputes its masks at every step and '
      'has no mask-update steps to skip.',
      stacklevel=2,
    )
    cfg['skip_gradients'] = False
  seed = cfg.pop('seed', None)
  updater = _registry.create_updater_from_config(cfg)
  # A compat class, or a user's class derived from one (its twin), takes jaxpruner's
  # config rules.
  cls = _compat_classes().get(type(updater)) or (type(updater) if is_twin(updater) else None)
  if cls is None:
    return updater
  kwargs = {f.name: getattr(updater, f.name) for f in dataclasses.fields(updater) if f.init}
  kwargs['scheduler'] = _schedule(updater, cfg)
  kwargs['packed_masks'] = cfg.get('packed_masks', False)
  kwargs['rng_seed'] = seed
  if isinstance(cfg.get('sparsity_type'), str):
    kwargs['sparsity_type'] = sparsity_types.from_string(cfg['sparsity_type'])
  if nm_erk_target is not None:
    dist = kwargs['sparsity_distribution_fn']
    kw = {k: dict(v) if k == 'custom_sparsity_map' else v for k, v in getattr(dist, 'kwargs', ())}
    kwargs['sparsity_distribution_fn'] = _sd.Partial(_sd.erk, **kw)
    kwargs['sparsity'] = nm_erk_target
  return cls(**kwargs)

"""Algorithms by name, and updaters from configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from prunax import algorithms
from prunax import pruning_at_init
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.base_updater import BaseUpdater

_ALGORITHMS: dict[str, type[BaseUpdater]] = {
    'no_prune': algorithms.NoPruning,
    'magnitude': algorithms.MagnitudePruning,
    'random': algorithms.RandomPruning,
    'saliency': algorithms.SaliencyPruning,
    'global_magnitude': algorithms.GlobalMagnitudePruning,
    'global_saliency': algorithms.GlobalSaliencyPruning,
    'magnitude_ste': algorithms.SteMagnitudePruning,
    'random_ste': algorithms.SteRandomPruning,
    'static_sparse': algorithms.StaticRandomSparse,
    'set': algorithms.SET,
    'rigl': algorithms.RigL,
    'snfs': algorithms.SNFS,
    'mest': algorithms.MEST,
    'granet': algorithms.GraNet,
    'acdc': algorithms.ACDC,
    'nm_set': algorithms.NMSET,
    'nm_rigl': algorithms.NMRigL,
    'autosparse': algorithms.AutoSparse,
    'str': algorithms.STR,
    'topkast': algorithms.TopKAST,
    'topkast_ga': algorithms.TopKASTGA,
    'sr_ste': algorithms.SRSTE,
    'snip': pruning_at_init.SNIP,
    'grasp': pruning_at_init.GraSP,
    'synflow': pruning_at_init.SynFlow,
    'fixed_masks': pruning_at_init.FixedMaskSparse,
}

# Keys create_updater_from_config understands (anything else is an error).
CONFIG_KEYS = frozenset({
    'algorithm', 'sparsity', 'dist_type', 'sparsity_type', 'update_freq', 'update_start_step',
    'update_end_step', 'drop_fraction', 'drop_fraction_fn', 'custom_sparsity_map', 'seed',
    'packed_masks', 'power', 'filter_fn', 'extra',
})


def register_algorithm(name: str, cls: type[BaseUpdater]) -> None:
  """Registers ``cls`` under ``name`` for :func:`create_updater_from_config`."""
  if not (isinstance(cls, type) and issubclass(cls, BaseUpdater)):
    raise TypeError(f'register_algorithm needs a BaseUpdater subclass, got {cls!r}.')
  if name in _ALGORITHMS and _ALGORITHMS[name] is not cls:
    raise ValueError(f'algorithm name {name!r} is already registered to '
                     f'{_ALGORITHMS[name].__name__}.')
  _ALGORITHMS[name] = cls


def all_algorithm_names() -> list[str]:
  """Names accepted by :func:`create_updater_from_config`."""
  return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type[BaseUpdater]:
  """The algorithm class registered as ``name``."""
  if name not in _ALGORITHMS:
    raise ValueError(f'Unknown algorithm {name!r}; valid names are {all_algorithm_names()}.')
  return _ALGORITHMS[name]


def _schedule(cls: type[BaseUpdater], cfg: Mapping[str, Any]):
  freq = cfg.get('update_freq', 10)
  start = cfg.get('update_start_step', 0)
  end = cfg.get('update_end_step')
  if cls.scheduler_kind == 'none':
    return sparsity_schedules.NoUpdateSchedule()
  if cls.scheduler_kind == 'periodic':
    return sparsity_schedules.PeriodicSchedule(freq, start, end)
  if cls.scheduler_kind == 'alternating':  # AC/DC: phases of update_freq steps.
    return algorithms.AlternatingSchedule(freq, start, end)
  if end is None or end == start:
    return sparsity_schedules.OneShotSchedule(start)
  return sparsity_schedules.PolynomialSchedule(freq, start, end, power=cfg.get('power', 3.0))


def create_updater_from_config(config: Any) -> BaseUpdater:
  """Builds an updater from a dict or ``ml_collections.ConfigDict``.

  Keys: ``algorithm`` (see :func:`all_algorithm_names`), ``sparsity``, ``dist_type``
  ('uniform' or 'erk'), ``sparsity_type`` ('unstructured', 'nm_N,M', 'block_B1,B2',
  'channel_AXIS'), ``update_freq``, ``update_start_step``, ``update_end_step``, ``power``,
  ``drop_fraction``, ``drop_fraction_fn``, ``custom_sparsity_map``, ``filter_fn``, ``seed``,
  ``packed_masks`` and ``extra`` (a dict of further constructor arguments).

  The schedule follows the algorithm: none for static sparse training, periodic for
  SET/RigL-style training, alternating phases of ``update_freq`` steps for AC/DC, and for
  pruning either one-shot at ``update_start_step`` (no
  ``update_end_step``) or gradual polynomial from start to end.

  Raises:
    ValueError: unknown keys or names, or invalid values.
  """
  cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  unknown = set(cfg) - CONFIG_KEYS
  if unknown:
    raise ValueError(f'Unknown sparsity config keys {sorted(unknown)}; valid keys are '
                     f'{sorted(CONFIG_KEYS)}.')
  if 'algorithm' not in cfg:
    raise ValueError(f'The sparsity config needs an "algorithm"; valid names are '
                     f'{all_algorithm_names()}.')
  cls = get_algorithm(cfg['algorithm'])
  kwargs: dict[str, Any] = dict(cfg.get('extra') or {})
  dist = sparsity_distributions.resolve(cfg.get('dist_type', 'uniform'))
  extras = {k: cfg[k] for k in ('custom_sparsity_map', 'filter_fn') if cfg.get(k) is not None}
  if extras:
    dist = sparsity_distributions.Partial(dist, **extras)
  # Without a config value, the class default (NoPruning and learned-threshold methods
  # need no target; SR-STE defaults to 2:4).
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  if 'sparsity_type' in cfg:
    kwargs['sparsity_type'] = sparsity_types.from_string(cfg['sparsity_type'])
  kwargs.update(
      sparsity=cfg.get('sparsity', defaults['sparsity']),
      sparsity_distribution_fn=dist,
      scheduler=_schedule(cls, cfg),
      seed=cfg.get('seed', 0),
      packed_masks=cfg.get('packed_masks', True))
  for key in ('drop_fraction', 'drop_fraction_fn'):
    if key in cfg:
      if not hasattr(cls, key):
        raise ValueError(f'{key} applies only to drop-and-grow algorithms (set, rigl), not to '
                         f'{cfg["algorithm"]!r}.')
      kwargs[key] = cfg[key]
  return cls(**kwargs)

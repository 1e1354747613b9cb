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

# Sparseland positioning of each algorithm (handbook 3.7-3.10): ``origin`` is 'dense',
# 'dense-to-sparse' (a dense model is trained at some point) or 'sparse-to-sparse' (never
# dense; pruning at init counts, its one dense gradient being negligible); ``dynamics`` is
# 'static' (the mask never changes after it is chosen) or 'dynamic'. The README's algorithm
# table states the same (tests/core/test_compare.py checks they agree). One dict per name.
ALGORITHM_INFO: dict[str, dict[str, str]] = {
    'no_prune': {'origin': 'dense', 'dynamics': 'static'},
    'magnitude': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'random': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'saliency': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'global_magnitude': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'global_saliency': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'magnitude_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'random_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'static_sparse': {'origin': 'sparse-to-sparse', 'dynamics': 'static'},
    'set': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic'},
    'rigl': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic'},
    'autosparse': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'str': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'topkast': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic'},
    'topkast_ga': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic'},
    'sr_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic'},
    'snip': {'origin': 'sparse-to-sparse', 'dynamics': 'static'},
    'grasp': {'origin': 'sparse-to-sparse', 'dynamics': 'static'},
    'synflow': {'origin': 'sparse-to-sparse', 'dynamics': 'static'},
    'fixed_masks': {'origin': 'sparse-to-sparse', 'dynamics': 'static'},
}
ORIGINS = ('dense', 'dense-to-sparse', 'sparse-to-sparse')
DYNAMICS = ('static', 'dynamic')

# Keys create_updater_from_config understands (anything else is an error).
CONFIG_KEYS = frozenset({
    'algorithm', 'sparsity', 'dist_type', 'sparsity_type', 'update_freq', 'update_start_step',
    'update_end_step', 'drop_fraction', 'drop_fraction_fn', 'custom_sparsity_map', 'seed',
    'packed_masks', 'power', 'filter_fn', 'extra',
})


def _check_info(name: str, info: Mapping[str, str]) -> dict[str, str]:
  info = dict(info)
  if info.get('origin') not in ORIGINS or info.get('dynamics') not in DYNAMICS:
    raise ValueError(f'Algorithm info of {name!r} needs origin in {list(ORIGINS)} and dynamics '
                     f'in {list(DYNAMICS)}, got {info!r}.')
  return info


def register_algorithm(name: str, cls: type[BaseUpdater],
                       info: Mapping[str, str] | None = None) -> None:
  """Registers ``cls`` under ``name`` for :func:`create_updater_from_config`.

  Args:
    name: the algorithm's name in configs.
    cls: the updater class.
    info: its positioning, ``{'origin': ..., 'dynamics': ...}`` (see :data:`ALGORITHM_INFO`);
      None: derived from the class (see :func:`algorithm_info`).
  """
  if not (isinstance(cls, type) and issubclass(cls, BaseUpdater)):
    raise TypeError(f'register_algorithm needs a BaseUpdater subclass, got {cls!r}.')
  if name in _ALGORITHMS and _ALGORITHMS[name] is not cls:
    raise ValueError(f'algorithm name {name!r} is already registered to '
                     f'{_ALGORITHMS[name].__name__}.')
  if info is not None:
    ALGORITHM_INFO[name] = _check_info(name, info)
  _ALGORITHMS[name] = cls


def algorithm_info(name: str) -> dict[str, str]:
  """The positioning of algorithm ``name``: ``{'origin': ..., 'dynamics': ...}``.

  From :data:`ALGORITHM_INFO`; for an algorithm registered without it, derived from its
  class (``is_sparse_training``: sparse-to-sparse, else dense-to-sparse; ``scheduler_kind``
  'none': static, else dynamic).
  """
  cls = get_algorithm(name)
  if name in ALGORITHM_INFO:
    return dict(ALGORITHM_INFO[name])
  return {'origin': 'sparse-to-sparse' if cls.is_sparse_training else 'dense-to-sparse',
          'dynamics': 'static' if cls.scheduler_kind == 'none' else 'dynamic'}


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
  SET/RigL-style training, and for pruning either one-shot at ``update_start_step`` (no
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

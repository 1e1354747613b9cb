"""Algorithms by name, and updaters from configs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from prunax import algorithms
from prunax import pruning_at_init
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax import strategies
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

# Sparseland positioning of each algorithm (handbook 3.7-3.10): ``origin`` is 'dense',
# 'dense-to-sparse' (a dense model is trained at some point) or 'sparse-to-sparse' (never
# dense; pruning at init counts, its one dense gradient being negligible); ``dynamics`` is
# 'static' (the mask never changes after it is chosen) or 'dynamic'. The README's algorithm
# table states the same (tests/core/test_compare.py checks they agree). ``schedule`` is the
# schedule a config of that name builds (see create_updater_from_config): 'pruning'
# (one-shot or gradual), 'periodic' (drop-and-grow every update_freq steps), 'alternating'
# (AC/DC's phases) or 'none' (the masks of init are kept). One dict per name.
ALGORITHM_INFO: dict[str, dict[str, str]] = {
  'no_prune': {'origin': 'dense', 'dynamics': 'static', 'schedule': 'pruning'},
  'magnitude': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'random': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'saliency': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'global_magnitude': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'global_saliency': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'magnitude_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'random_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'static_sparse': {'origin': 'sparse-to-sparse', 'dynamics': 'static', 'schedule': 'none'},
  'set': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
  'rigl': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
  'autosparse': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'none'},
  'str': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'none'},
  'topkast': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'topkast_ga': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'sr_ste': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'snip': {'origin': 'sparse-to-sparse', 'dynamics': 'static', 'schedule': 'none'},
  'grasp': {'origin': 'sparse-to-sparse', 'dynamics': 'static', 'schedule': 'none'},
  'synflow': {'origin': 'sparse-to-sparse', 'dynamics': 'static', 'schedule': 'none'},
  'fixed_masks': {'origin': 'sparse-to-sparse', 'dynamics': 'static', 'schedule': 'none'},
  'snfs': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
  'mest': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
  'granet': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'},
  'acdc': {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'alternating'},
  'nm_set': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
  'nm_rigl': {'origin': 'sparse-to-sparse', 'dynamics': 'dynamic', 'schedule': 'periodic'},
}
ORIGINS = ('dense', 'dense-to-sparse', 'sparse-to-sparse')
DYNAMICS = ('static', 'dynamic')
SCHEDULES = ('pruning', 'periodic', 'alternating', 'none')
_INFO_KEYS = {'origin': ORIGINS, 'dynamics': DYNAMICS, 'schedule': SCHEDULES}

# jaxpruner's name for the registry (the same dict: register_algorithm adds to both).
ALGORITHM_REGISTRY = _ALGORITHMS

# Keys create_updater_from_config understands; any other key must be a constructor field
# of the algorithm (jaxpruner passes the rest of its config to the class).
CONFIG_KEYS = frozenset(
  {
    'algorithm',
    'sparsity',
    'dist_type',
    'sparsity_type',
    'update_freq',
    'update_start_step',
    'update_end_step',
    'drop_fraction',
    'drop_fraction_fn',
    'custom_sparsity_map',
    'seed',
    'packed_masks',
    'power',
    'filter_fn',
    'extra',
  }
)


def _check_info(name: str, info: Mapping[str, str]) -> dict[str, str]:
  info = dict(info)
  for key, valid in _INFO_KEYS.items():
    if info.get(key) not in valid:
      raise ValueError(
        f'Algorithm info of {name!r} needs {key} in {list(valid)}, got {info!r} (keys: '
        f'{", ".join(f"{k} in {list(v)}" for k, v in _INFO_KEYS.items())}).'
      )
  unknown = set(info) - set(_INFO_KEYS)
  if unknown:
    raise ValueError(
      f'Algorithm info of {name!r} has unknown keys {sorted(unknown)}; valid keys are '
      f'{sorted(_INFO_KEYS)}.'
    )
  return info


def _inherited_info(cls: type) -> dict[str, str]:
  """The info of the nearest registered base class of ``cls`` (its first registered
  name), or that of a dense-to-sparse pruner when none is registered."""
  for base in cls.__mro__:
    for name, registered in _ALGORITHMS.items():
      if registered is base and name in ALGORITHM_INFO:
        return dict(ALGORITHM_INFO[name])
  return {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'schedule': 'pruning'}


def register_algorithm(
  name: str, cls: type[BaseUpdater], info: Mapping[str, str] | None = None
) -> None:
  """Registers ``cls`` under ``name`` for :func:`create_updater_from_config`.

  Args:
    name: the algorithm's name in configs.
    cls: the updater class.
    info: its metadata, ``{'origin': ..., 'dynamics': ..., 'schedule': ...}`` (see
      :data:`ALGORITHM_INFO`); keys left out are those of its nearest registered base
      class (see :func:`algorithm_info`).
  """
  if not (isinstance(cls, type) and issubclass(cls, BaseUpdater)):
    raise TypeError(f'register_algorithm needs a BaseUpdater subclass, got {cls!r}.')
  if name in _ALGORITHMS and _ALGORITHMS[name] is not cls:
    raise ValueError(
      f'algorithm name {name!r} is already registered to {_ALGORITHMS[name].__name__}.'
    )
  if info is not None:
    ALGORITHM_INFO[name] = _check_info(name, {**_inherited_info(cls), **dict(info)})
  _ALGORITHMS[name] = cls


def algorithm_info(name: str) -> dict[str, str]:
  """The metadata of algorithm ``name``: ``{'origin': ..., 'dynamics': ..., 'schedule': ...}``.

  From :data:`ALGORITHM_INFO`; for an algorithm registered without it, that of its nearest
  registered base class (a subclass of SET is periodic and sparse-to-sparse).
  """
  cls = get_algorithm(name)
  if name in ALGORITHM_INFO:
    return dict(ALGORITHM_INFO[name])
  return _inherited_info(cls)


def schedule_kind(cls: type[BaseUpdater]) -> str:
  """The ``schedule`` metadata (see :data:`ALGORITHM_INFO`) of the algorithm class ``cls``:
  that of its registered name, else of its nearest registered base class."""
  return _inherited_info(cls)['schedule']


def all_algorithm_names() -> list[str]:
  """Names accepted by :func:`create_updater_from_config`."""
  return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type[BaseUpdater]:
  """The algorithm class registered as ``name``."""
  if not isinstance(name, str) or name not in _ALGORITHMS:
    raise ValueError(f'Unknown algorithm {name!r}; valid names are {all_algorithm_names()}.')
  return _ALGORITHMS[name]


def _schedule(kind: str, cfg: Mapping[str, Any]):
  freq = cfg.get('update_freq', 10)
  start = cfg.get('update_start_step', 0)
  end = cfg.get('update_end_step')
  if kind == 'none':
    return sparsity_schedules.NoUpdateSchedule()
  if kind == 'periodic':
    return sparsity_schedules.PeriodicSchedule(freq, start, end)
  if kind == 'alternating':  # AC/DC: phases of update_freq steps.
    return algorithms.AlternatingSchedule(freq, start, end)
  if end is None or end == start:
    return sparsity_schedules.OneShotSchedule(start)
  return sparsity_schedules.PolynomialSchedule(freq, start, end, power=cfg.get('power', 3.0))


# Constructor arguments the config builds from its own keys, so ``extra`` may not set them.
_BUILT_FROM_KEYS = {
  'sparsity': 'sparsity',
  'sparsity_distribution_fn': 'dist_type',
  'sparsity_type': 'sparsity_type',
  'scheduler': 'update_freq/update_start_step/update_end_step/power',
  'seed': 'seed',
  'packed_masks': 'packed_masks',
  'drop_fraction': 'drop_fraction',
  'drop_fraction_fn': 'drop_fraction_fn',
}


def _extra_kwargs(cls: type[BaseUpdater], extra: Any) -> dict[str, Any]:
  """The config's ``extra`` constructor arguments, checked against ``cls``'s fields."""
  if extra is None:
    return {}
  if not isinstance(extra, Mapping):
    raise TypeError(
      f'The config\'s "extra" must be a mapping of further {cls.__name__} arguments, got {extra!r}.'
    )
  fields = {f.name for f in dataclasses.fields(cls)} - set(_BUILT_FROM_KEYS)
  for key in extra:
    if key in _BUILT_FROM_KEYS:
      raise ValueError(
        f'"extra" sets {key!r}, which the config builds from its key(s) '
        f'{_BUILT_FROM_KEYS[key]!r}; set it there.'
      )
    if key not in fields:
      raise ValueError(
        f'"extra" has {key!r}, which is not an argument of {cls.__name__}; valid '
        f'extra arguments are {sorted(fields)}.'
      )
  return dict(extra)


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
  if 'algorithm' not in cfg:
    raise ValueError(
      f'The sparsity config needs an "algorithm"; valid names are {all_algorithm_names()}.'
    )
  cls = get_algorithm(cfg['algorithm'])
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(cfg) - CONFIG_KEYS - fields
  if unknown:
    raise ValueError(
      f'Unknown sparsity config keys {sorted(unknown)}; valid keys are '
      f'{sorted(CONFIG_KEYS)} and the fields of {cls.__name__}.'
    )
  kwargs = _extra_kwargs(cls, cfg.get('extra'))
  # Constructor arguments given as config keys pass through (as in jaxpruner's configs).
  kwargs.update({k: v for k, v in cfg.items() if k not in CONFIG_KEYS})
  dist_type = cfg.get('dist_type', 'uniform')
  if (
    isinstance(cls.selection_strategy, strategies.GlobalThreshold)
    and str(dist_type).lower() == 'erk'
  ):
    # jaxpruner's configs name a distribution that its global pruners ignore.
    warnings.warn(
      f'{cfg["algorithm"]} chooses per-layer sparsities with one global '
      'threshold; dist_type="erk" is not used (as in jaxpruner).',
      stacklevel=2,
    )
    dist_type = 'uniform'
  try:
    dist = sparsity_distributions.resolve(dist_type)
  except ValueError as e:
    raise ValueError(f'dist_type: {e}') from None
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
    scheduler=_schedule(algorithm_info(cfg['algorithm'])['schedule'], cfg),
    seed=cfg.get('seed', 0),
    packed_masks=cfg.get('packed_masks', True),
  )
  for key in ('drop_fraction', 'drop_fraction_fn'):
    if key in cfg:
      if not hasattr(cls, key):
        takers = sorted(n for n, c in _ALGORITHMS.items() if hasattr(c, key))
        raise ValueError(
          f'{key} applies only to drop-and-grow algorithms ({", ".join(takers)}), not to '
          f'{cfg["algorithm"]!r}.'
        )
      kwargs[key] = cfg[key]
  return cls(**kwargs)

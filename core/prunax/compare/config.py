"""Comparison configs: the shipped defaults, YAML / ml_collections files, overrides, checks.

A config is a mapping whose keys are listed in ``configs/default.yaml``; a user config
(YAML, or a Python file whose ``get_config()`` returns an ``ml_collections.ConfigDict`` or
a dict) is merged over those defaults, and command-line overrides over that. Everything is
checked here, before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from prunax import registry
from prunax.base_updater import BaseUpdater

CONFIG_DIR = os.path.join(os.path.dirname(__file__), 'configs')
SCHEDULES = ('gradual', 'one_shot', 'START:END:FREQ')
BUDGETS = ('equal_steps', 'equal_flops')
# Keys that do not change what a finished (algorithm, seed) cell computed.
_CELL_INDEPENDENT = frozenset(
  {
    'algorithms',
    'optional_algorithms',
    'seeds',
    'run_dir',
    'quick',
    'categories',
    'observe_points',
    'step_multipliers',
  }
)
# Config keys passed on to prunax.create_updater_from_config.
_UPDATER_KEYS = (
  'sparsity',
  'dist_type',
  'sparsity_type',
  'update_freq',
  'update_start_step',
  'update_end_step',
  'drop_fraction',
)


class ConfigError(ValueError):
  """A comparison config, task or run directory that cannot be used."""


def _read_yaml(path: str) -> dict[str, Any]:
  import yaml

  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except OSError as e:
    raise ConfigError(f'Cannot read config file {path!r}: {e.strerror}.') from e
  except yaml.YAMLError as e:
    raise ConfigError(f'Malformed YAML in config file {path!r}: {e}') from e
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(
      f'Config file {path!r} must hold a mapping of keys to values, got a {type(data).__name__}.'
    )
  return data


def _read_python(path: str) -> dict[str, Any]:
  spec = importlib.util.spec_from_file_location('prunax_compare_user_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A user's file may fail in any way; name it.
    raise ConfigError(f'Config file {path!r} failed to load: {type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(
      f'Config file {path!r} must define get_config() returning an '
      'ml_collections.ConfigDict or a dict.'
    )
  return as_dict(module.get_config(), path)


def as_dict(config: Any, where: str = 'the config') -> dict[str, Any]:
  """A plain dict from a dict or ``ml_collections.ConfigDict``."""
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ConfigError(
      f'{where} must be a mapping or an ml_collections.ConfigDict, got {type(config).__name__}.'
    )
  return dict(config)


def shipped_config(name: str = 'default') -> str:
  """Path of a config shipped in ``prunax/compare/configs``."""
  return os.path.join(CONFIG_DIR, f'{name}.yaml')


def load_config(
  source: str | Mapping[str, Any] | Any | None = None,
  overrides: Mapping[str, Any] | None = None,
  quick: bool = False,
) -> dict[str, Any]:
  """The defaults, merged with ``source`` and ``overrides``, checked.

  Args:
    source: None (defaults only), a path to a ``.yaml``/``.yml`` or ``.py`` file, the name of
      a shipped config, a dict, or an ``ml_collections.ConfigDict``.
    overrides: keys replacing those of ``source`` (None values are ignored), applied last.
    quick: apply the config's ``quick`` keys (few steps, one seed, a few algorithms) over
      ``source`` (its algorithm lists only when ``source`` names no algorithms).

  Returns:
    The checked config (see :func:`check_config`).

  Raises:
    ConfigError: unreadable or malformed file, unknown keys, bad values.
  """
  config = _read_yaml(shipped_config('default'))
  if source is None:
    user = {}
  elif isinstance(source, str):
    if os.path.isfile(source):
      user = _read_python(source) if source.endswith('.py') else _read_yaml(source)
    elif os.path.isfile(shipped_config(source)):
      user = _read_yaml(shipped_config(source))
    else:
      raise ConfigError(
        f'Config file {source!r} does not exist (nor is it a shipped config: '
        f'{sorted(f[:-5] for f in os.listdir(CONFIG_DIR))}).'
      )
  else:
    user = as_dict(source)
  # Derived by the runner from training_budget: a checked config may carry it back in.
  user = {k: v for k, v in user.items() if k != 'step_multipliers'}
  unknown = set(user) - set(config)
  if unknown:
    raise ConfigError(f'Unknown config keys {sorted(unknown)}; valid keys are {sorted(config)}.')
  config.update(copy.deepcopy(user))
  if quick:
    quick_keys = as_dict(config.get('quick') or {}, 'quick')
    unknown = set(quick_keys) - set(config)
    if unknown:
      raise ConfigError(
        f'Unknown keys {sorted(unknown)} in "quick"; valid keys are {sorted(config)}.'
      )
    if 'algorithms' in user:  # Quick shortens the user's comparison; it keeps their list.
      quick_keys = {
        k: v for k, v in quick_keys.items() if k not in ('algorithms', 'optional_algorithms')
      }
    config.update(quick_keys)
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  unknown = set(overrides) - set(config)
  if unknown:
    raise ConfigError(f'Unknown config keys {sorted(unknown)}; valid keys are {sorted(config)}.')
  config.update(overrides)
  return check_config(config)


def check_sparsity(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ConfigError(f'sparsity must be a number in [0, 1), got {value!r}.')
  return float(value)


def _check_sparsity_type(value) -> str:
  from prunax import sparsity_types

  if not isinstance(value, str):
    raise ConfigError(
      f'sparsity_type must be a string such as "unstructured" or "nm_2,4", got {value!r}.'
    )
  try:
    sparsity_types.from_string(value)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return value


def _sweep(value, name: str, check) -> float | str | list:
  """One value, or a list of distinct values (a sweep; a string "a;b" or "0.5,0.8" too)."""
  if isinstance(value, str) and name == 'sparsity':
    try:
      value = [float(v) for v in value.split(',')]
    except ValueError as e:
      raise ConfigError(
        f'sparsity must be a number in [0, 1) or a comma-separated list of them, got {value!r}.'
      ) from e
  elif isinstance(value, str) and ';' in value:
    value = [v.strip() for v in value.split(';') if v.strip()]
  if isinstance(value, (list, tuple)):
    if not value:
      raise ConfigError(f'{name} is an empty list; give at least one value.')
    values = [check(v) for v in value]
    if len(set(values)) != len(values):
      raise ConfigError(f'{name} lists a value twice: {list(value)}.')
    return values[0] if len(values) == 1 else values
  return check(value)


def points(cfg: Mapping[str, Any]) -> list[tuple[str, float]]:
  """The (sparsity_type, sparsity) points of a comparison, types first, sparsities ascending."""
  types = cfg['sparsity_type'] if isinstance(cfg['sparsity_type'], list) else [cfg['sparsity_type']]
  sparsities = cfg['sparsity'] if isinstance(cfg['sparsity'], list) else [cfg['sparsity']]
  return [(t, s) for t in types for s in sorted(sparsities)]


def point_config(cfg: Mapping[str, Any], sparsity_type: str, sparsity: float) -> dict[str, Any]:
  """``cfg`` at one point of its sweep (scalar ``sparsity`` and ``sparsity_type``)."""
  return dict(cfg, sparsity=sparsity, sparsity_type=sparsity_type)


def is_sweep(cfg: Mapping[str, Any]) -> bool:
  """Whether ``cfg`` has more than one (sparsity_type, sparsity) point."""
  return len(points(cfg)) > 1


def _int(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return value


def _names(value, name: str) -> list[str]:
  if isinstance(value, str):
    value = [v.strip() for v in value.split(',') if v.strip()]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ConfigError(f'{name} must be a list of algorithm names, got {value!r}.')
  return list(value)


def check_config(config: dict[str, Any]) -> dict[str, Any]:
  """Checks types and ranges and normalises ``seeds`` to a list and ``algorithms`` to names.

  Raises:
    ConfigError: naming the bad key, its value and what would be valid.
  """
  cfg = dict(config)
  cfg['steps'] = _int(cfg['steps'], 'steps', 1)
  cfg['observe_points'] = _int(cfg['observe_points'], 'observe_points', 1)
  seeds = cfg['seeds']
  if isinstance(seeds, str):
    try:
      seeds = [int(s) for s in seeds.split(',')] if ',' in seeds else int(seeds)
    except ValueError as e:
      raise ConfigError(
        f'seeds must be a count or a comma-separated list of integers, got {cfg["seeds"]!r}.'
      ) from e
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    seeds = list(range(_int(seeds, 'seeds (a count)', 1)))
  if (
    not isinstance(seeds, (list, tuple))
    or not seeds
    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    or len(set(seeds)) != len(seeds)
  ):
    raise ConfigError(
      f'seeds must be a count >= 1 or a list of distinct integers >= 0, got {cfg["seeds"]!r}.'
    )
  cfg['seeds'] = list(seeds)
  cfg['algorithms'] = _names(cfg['algorithms'], 'algorithms')
  cfg['optional_algorithms'] = _names(cfg['optional_algorithms'] or [], 'optional_algorithms')
  if not cfg['algorithms']:
    raise ConfigError(
      f'algorithms is empty; name at least one of {registry.all_algorithm_names()}.'
    )
  known = registry.all_algorithm_names()
  for name in cfg['algorithms']:
    if name not in known:
      raise ConfigError(f'Unknown algorithm {name!r}; valid algorithms are {known}.')
  if len(set(cfg['algorithms'])) != len(cfg['algorithms']):
    raise ConfigError(f'algorithms lists a name twice: {cfg["algorithms"]}.')
  cfg['sparsity'] = _sweep(cfg['sparsity'], 'sparsity', check_sparsity)
  cfg['sparsity_type'] = _sweep(cfg['sparsity_type'], 'sparsity_type', _check_sparsity_type)
  budget = cfg['training_budget']
  if budget not in BUDGETS and (
    isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 1
  ):
    raise ConfigError(
      f'training_budget must be one of {list(BUDGETS)} or a step multiplier '
      f'>= 1 for sparse-to-sparse algorithms (e.g. 2 or 5), got {budget!r}.'
    )
  _int(cfg['max_step_multiplier'], 'max_step_multiplier', 1)
  if cfg['dist_type'] not in ('uniform', 'erk'):
    raise ConfigError(f'dist_type must be "uniform" or "erk", got {cfg["dist_type"]!r}.')
  schedule_window(cfg, 'magnitude')  # Checks the schedule.
  for key in ('task_args', 'algorithm_overrides', 'categories'):
    cfg[key] = as_dict(cfg[key] or {}, key)
  for name, extra in cfg['algorithm_overrides'].items():
    if name not in known:
      raise ConfigError(
        f'algorithm_overrides names unknown algorithm {name!r}; valid algorithms are {known}.'
      )
    as_dict(extra, f'algorithm_overrides[{name!r}]')
  if not isinstance(cfg['run_dir'], str) or not cfg['run_dir']:
    raise ConfigError(f'run_dir must be a directory path, got {cfg["run_dir"]!r}.')
  return cfg


def schedule_window(cfg: Mapping[str, Any], algorithm: str) -> dict[str, int | None]:
  """``update_freq``, ``update_start_step`` and ``update_end_step`` for ``algorithm``.

  ``gradual``: pruning from 20% to 75% of the steps, sparse training (periodic mask
  updates) from step 0 to 75%; ``one_shot``: pruning once at 50%; ``START:END:FREQ``: the
  same window for every algorithm. Explicit ``update_*`` keys win.
  """
  steps, schedule = algorithm_steps(cfg, algorithm), cfg['schedule']
  freq = max(1, steps // 30)
  periodic = (
    algorithm in registry.all_algorithm_names()
    and registry.algorithm_info(algorithm)['schedule'] == 'periodic'
  )
  if schedule == 'gradual':
    window = {
      'update_freq': freq,
      'update_start_step': 0 if periodic else steps // 5,
      'update_end_step': 3 * steps // 4,
    }
  elif schedule == 'one_shot':
    window = (
      {'update_freq': freq, 'update_start_step': 0, 'update_end_step': 3 * steps // 4}
      if periodic
      else {'update_freq': freq, 'update_start_step': steps // 2, 'update_end_step': None}
    )
  else:
    parts = str(schedule).split(':')
    try:
      start, end, freq = (int(p) for p in parts)
    except ValueError as e:
      raise ConfigError(
        f'schedule must be one of {list(SCHEDULES)} (e.g. "100:400:10"), got {schedule!r}.'
      ) from e
    window = {'update_freq': freq, 'update_start_step': start, 'update_end_step': end}
  for key in window:
    if cfg.get(key) is not None:
      window[key] = cfg[key]
  return window


def algorithm_steps(cfg: Mapping[str, Any], algorithm: str) -> int:
  """Training steps of ``algorithm``: ``steps`` times its multiplier under the training
  budget (``cfg['step_multipliers']``, set by the runner; 1 without)."""
  return int(round(cfg['steps'] * (cfg.get('step_multipliers') or {}).get(algorithm, 1)))


def updater_config(cfg: Mapping[str, Any], algorithm: str, seed: int) -> dict[str, Any]:
  """The ``create_updater_from_config`` dict of ``algorithm`` under the comparison ``cfg``."""
  out: dict[str, Any] = {'algorithm': algorithm, 'seed': seed}
  out.update({k: cfg[k] for k in _UPDATER_KEYS if cfg.get(k) is not None})
  out.update(schedule_window(cfg, algorithm))
  if out['update_end_step'] is None:
    del out['update_end_step']
  cls = registry.get_algorithm(algorithm)
  if 'training_steps' in {f.name for f in dataclasses.fields(cls)}:
    out['training_steps'] = algorithm_steps(cfg, algorithm)  # AutoSparse's alpha annealing
  if not hasattr(cls, 'drop_fraction'):
    out.pop('drop_fraction', None)
  if algorithm == 'no_prune':
    out['sparsity'] = 0.0
  if str(out.get('sparsity_type', '')).strip().lower().startswith('nm_'):
    # N:M fixes every leaf's sparsity at 1 - n/m: a per-leaf distribution (ERK) cannot apply.
    out['dist_type'] = 'uniform'
  out.update(cfg['algorithm_overrides'].get(algorithm, {}))
  return out


def make_updater(cfg: Mapping[str, Any], algorithm: str, seed: int) -> BaseUpdater:
  """The updater of ``algorithm`` for ``seed``; ConfigError names the algorithm on failure."""
  try:
    return registry.create_updater_from_config(updater_config(cfg, algorithm, seed))
  except (ValueError, TypeError) as e:
    raise ConfigError(f'Algorithm {algorithm!r} cannot be built from the config: {e}') from e


def cell_fingerprint(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The config keys that determine what every (algorithm, seed) cell computes."""
  return {k: v for k, v in sorted(cfg.items()) if k not in _CELL_INDEPENDENT}

"""The smallest fixes that let dopamine-rl 4.1.2 import and run on current JAX and numpy 2.

Each fix is applied by :func:`apply` (called when ``prunax_dopamine`` is imported) only
when the installed versions need it; :func:`applied` lists the ones that were applied.
Dopamine must be imported after ``prunax_dopamine`` (or after calling :func:`apply`).

* ``baselines``: ``dopamine.discrete_domains.atari_lib`` (imported by ``run_experiment``
  for every environment) does ``from baselines.common import atari_wrappers``, but OpenAI
  baselines is not a dependency of dopamine-rl and its last release does not install on
  current Python. Only the PPO preprocessing (``create_atari_environment.
  use_ppo_preprocessing=True``) uses those wrappers, so when baselines is missing an empty
  stand-in module is registered; using one of its wrappers raises an error that says so.
* ``tfp_xla_alias``: tensorflow-probability <= 0.25 reads
  ``jax.interpreters.xla.pytype_aval_mappings``, removed in jax 0.7 (imported by
  ``dopamine/jax/networks.py``). The alias is pointed at the dict that replaced it,
  ``jax.core.pytype_aval_mappings`` (the same object the alias was on older jax).
* ``numpy_bool8``: the legacy ``gym`` 0.25 environment checker (used with
  ``create_gym_environment.use_legacy_gym=True``) tests ``isinstance(x, np.bool8)``, an alias
  numpy 2 removed; it is restored as ``np.bool_`` (what it always was).

The other known gaps are not code: ``tensorboard`` is a dependency of this package, and the
gin configs missing from the dopamine-rl wheel ship in ``prunax_dopamine/configs``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types

import numpy as np

_APPLIED: list[str] = []


def _missing_module(name: str) -> bool:
  return importlib.util.find_spec(name) is None


class _MissingAtariWrappers(types.ModuleType):
  """Stand-in for ``baselines.common.atari_wrappers``: any wrapper access explains itself."""

  def __getattr__(self, name: str):
    if name.startswith('__'):
      raise AttributeError(name)
    raise AttributeError(
      f'baselines.common.atari_wrappers.{name} is not available: OpenAI baselines is not '
      'installed (prunax_dopamine registered a stand-in so that dopamine imports). It is '
      'used only by create_atari_environment.use_ppo_preprocessing=True; install baselines '
      'to use that option.'
    )


def _fix_baselines() -> bool:
  if 'baselines' in sys.modules or not _missing_module('baselines'):
    return False
  baselines = types.ModuleType('baselines')
  common = types.ModuleType('baselines.common')
  wrappers = _MissingAtariWrappers('baselines.common.atari_wrappers')
  baselines.common = common
  common.atari_wrappers = wrappers
  sys.modules.update(
    {
      'baselines': baselines,
      'baselines.common': common,
      'baselines.common.atari_wrappers': wrappers,
    }
  )
  return True


def _tfp_version() -> tuple[int, int] | None:
  try:
    version = importlib.metadata.version('tensorflow-probability')
  except importlib.metadata.PackageNotFoundError:
    return None  # Not installed, or the nightly (tfp-nightly), which guards this access.
  major, minor = version.split('.')[:2]
  return int(major), int(minor)


def _fix_tfp_xla_alias() -> bool:
  from jax.interpreters import xla

  version = _tfp_version()
  if hasattr(xla, 'pytype_aval_mappings') or version is None or version > (0, 25):
    return False
  from jax._src import core

  xla.pytype_aval_mappings = core.pytype_aval_mappings
  return True


def _fix_numpy_bool8() -> bool:
  if hasattr(np, 'bool8') or _missing_module('gym'):
    return False
  np.bool8 = np.bool_
  return True


def apply() -> tuple[str, ...]:
  """Applies the fixes the installed versions need (idempotent).

  Returns:
    The names of the fixes applied so far in this process.
  """
  for name, fix in (
    ('baselines', _fix_baselines),
    ('tfp_xla_alias', _fix_tfp_xla_alias),
    ('numpy_bool8', _fix_numpy_bool8),
  ):
    if name not in _APPLIED and fix():
      _APPLIED.append(name)
  return applied()


def applied() -> tuple[str, ...]:
  """Names of the fixes applied in this process."""
  return tuple(_APPLIED)

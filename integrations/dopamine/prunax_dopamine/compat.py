"""The smallest fixes that let dopamine-rl 4.1.2 import and run on current JAX and numpy 2.

Nothing is patched on import. :func:`needed` names the fixes the installed versions need;
:func:`apply` applies those (and only those) and :func:`applied` lists the ones applied.
Call :func:`apply` before importing Dopamine: the launcher ``python -m prunax_dopamine.run``
and the package's agent and runner names (``prunax_dopamine.PrunedDQNAgent``,
``prunax_dopamine.create_pruned_runner``) do; importing ``prunax_dopamine.agents`` or
``prunax_dopamine.runner`` directly before that raises an ``ImportError`` saying so
(:func:`require`).

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


def _needs_baselines() -> bool:
  return 'baselines' not in sys.modules and _missing_module('baselines')


def _fix_baselines() -> bool:
  if not _needs_baselines():
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


def _needs_tfp_xla_alias() -> bool:
  from jax.interpreters import xla

  version = _tfp_version()
  return not hasattr(xla, 'pytype_aval_mappings') and version is not None and version <= (0, 25)


def _fix_tfp_xla_alias() -> bool:
  if not _needs_tfp_xla_alias():
    return False
  from jax._src import core
  from jax.interpreters import xla

  xla.pytype_aval_mappings = core.pytype_aval_mappings
  return True


def _needs_numpy_bool8() -> bool:
  return not hasattr(np, 'bool8') and not _missing_module('gym')


def _fix_numpy_bool8() -> bool:
  if not _needs_numpy_bool8():
    return False
  np.bool8 = np.bool_
  return True


_FIXES = (
  ('baselines', _needs_baselines, _fix_baselines),
  ('tfp_xla_alias', _needs_tfp_xla_alias, _fix_tfp_xla_alias),
  ('numpy_bool8', _needs_numpy_bool8, _fix_numpy_bool8),
)


def needed() -> tuple[str, ...]:
  """Names of the fixes the installed versions need and that are not applied yet."""
  return tuple(name for name, needs, _ in _FIXES if needs())


def apply() -> tuple[str, ...]:
  """Applies the fixes the installed versions need (idempotent).

  Returns:
    The names of the fixes applied so far in this process.
  """
  for name, _, fix in _FIXES:
    if name not in _APPLIED and fix():
      _APPLIED.append(name)
  return applied()


def applied() -> tuple[str, ...]:
  """Names of the fixes applied in this process."""
  return tuple(_APPLIED)


def require() -> None:
  """Raises ``ImportError`` if Dopamine needs fixes that :func:`apply` has not applied.

  Called by the modules that import Dopamine (``prunax_dopamine.agents``, ``.runner``)
  before they do, so that a missing :func:`apply` is named instead of failing inside
  Dopamine.
  """
  missing = [name for name in needed() if name != 'numpy_bool8']  # bool8: only at run time
  if missing:
    raise ImportError(
      f'dopamine-rl does not import on the installed versions without the fixes {missing}: '
      'call prunax_dopamine.compat.apply() before importing Dopamine or '
      'prunax_dopamine.agents/runner (python -m prunax_dopamine.run, '
      'prunax_dopamine.PrunedDQNAgent and prunax_dopamine.create_pruned_runner do).'
    )

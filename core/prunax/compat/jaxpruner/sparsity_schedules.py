"""jaxpruner's schedule semantics on prunax's schedules.

Differences from :mod:`prunax.sparsity_schedules` (which ``import prunax`` keeps):

* ``PeriodicSchedule`` / ``PolynomialSchedule`` update the masks at steps with
  ``step % update_freq == 0`` in ``[update_start_step, update_end_step]`` (the end
  included; ``update_end_step=None``: no end).
* ``PolynomialSchedule`` has progress ``p = clip(step + 1 - start, 0, end - start) /
  (end - start)`` and sparsity ``target * (1 - (1 - p) ** power)``; the wrapped optimizer
  evaluates it at the last mask-update step, ``get_sparsity_at_step`` at ``step``.
* ``OneShotSchedule.get_sparsity_at_step`` returns the targets at every step (the masks
  still change only at ``target_step``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prunax import sparsity_schedules as _prunax
from prunax.tree_util import is_none

__all__ = ['NoUpdateSchedule', 'OneShotSchedule', 'PeriodicSchedule', 'PolynomialSchedule']


@dataclasses.dataclass(frozen=True)
class NoUpdateSchedule(_prunax.NoUpdateSchedule):
  """Masks made once at ``init`` (jaxpruner's default schedule)."""


@dataclasses.dataclass(frozen=True)
class OneShotSchedule(_prunax.OneShotSchedule):
  """Prunes once, at ``target_step``; ``get_sparsity_at_step`` is the target at any step."""

  def get_sparsity_at_step(self, target_sparsities, step):
    """``target_sparsities`` unchanged (jaxpruner's value at every step)."""
    del step
    return target_sparsities


def _jaxpruner_update_step(schedule, step):
  step = jnp.asarray(step)
  ok = (step % schedule.update_freq == 0) & (step >= schedule.update_start_step)
  if schedule.update_end_step is not None:
    ok &= step <= schedule.update_end_step
  return ok


@dataclasses.dataclass(frozen=True)
class PeriodicSchedule(_prunax.PeriodicSchedule):
  """Constant sparsity; masks updated where ``step % update_freq == 0``, start to end."""

  def is_update_step(self, step):
    return _jaxpruner_update_step(self, step)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(_prunax.PolynomialSchedule):
  """jaxpruner's gradual pruning: ``target * (1 - (1 - p) ** power)``, ``p`` one step
  ahead (``(step + 1 - start) / (end - start)``, clipped to [0, 1])."""

  power: float = 3

  def is_update_step(self, step):
    return _jaxpruner_update_step(self, step)

  def _progress(self, step):
    length = self.update_end_step - self.update_start_step
    return jnp.clip(jnp.asarray(step) + 1 - self.update_start_step, 0, length) / length

  def sparsity(self, step, target):
    step = jnp.asarray(step)
    # The last mask-update step at or before `step` (masks change only there).
    last = jnp.minimum((step // self.update_freq) * self.update_freq, self.update_end_step)
    last = jnp.where(last < self.update_start_step, self.update_start_step - 1, last)
    progress = self._progress(last)
    return (target * (1.0 - (1.0 - progress) ** self.power)).astype(jnp.float32)

  def get_sparsity_at_step(self, target_sparsities, step):
    """``target * (1 - (1 - p) ** power)`` at ``step`` for every non-None target."""
    progress = self._progress(step)
    return jax.tree.map(
      lambda t: None if t is None else t * (1.0 - (1.0 - progress) ** self.power),
      target_sparsities,
      is_leaf=is_none,
    )

"""When masks are updated and at what sparsity.

A schedule answers two questions for the step counter ``step`` (the number of optimizer
updates done before this one, a traced int32 scalar inside ``jit``):

* ``is_update_step(step)``: whether the masks are recomputed at this step (a boolean
  array; a schedule that knows the answer without the step returns a NumPy bool, and the
  engine then traces no mask update: :class:`NoUpdateSchedule`);
* ``sparsity(step, target)``: the sparsity a leaf with final sparsity ``target`` has after
  this step (``target`` may be a per-leaf float).

Steps before a schedule's start leave every weight unpruned (sparsity 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from prunax import _checks


class _JaxprunerNames:
  """jaxpruner's names for the two schedule questions (tree in, tree out; None stays None)."""

  def get_sparsity_at_step(self, target_sparsities, step):
    """``sparsity(step, t)`` for every leaf ``t`` of ``target_sparsities`` (None: dense)."""
    return jax.tree.map(
      lambda t: None if t is None else self.sparsity(step, t),
      target_sparsities,
      is_leaf=lambda x: x is None,
    )

  def is_mask_update_iter(self, step):
    """``is_update_step(step)``; False for ``step=None``."""
    return False if step is None else self.is_update_step(step)


def _set_int(schedule, field: str, minimum: int) -> None:
  """Checks the int field ``field`` of a frozen ``schedule`` (stored as a Python int)."""
  value = _checks.integer(getattr(schedule, field), f'{type(schedule).__name__}.{field}', minimum)
  object.__setattr__(schedule, field, value)


@dataclasses.dataclass(frozen=True)
class NoUpdateSchedule(_JaxprunerNames):
  """Masks are computed once at ``init`` and never change (static sparse training)."""

  def is_update_step(self, step):
    """A static NumPy False: the engine then traces and compiles no mask update."""
    del step
    return np.bool_(False)

  def sparsity(self, step, target):
    del step
    return target


@dataclasses.dataclass(frozen=True)
class OneShotSchedule(_JaxprunerNames):
  """Prunes to the target sparsity once, at ``target_step``."""

  target_step: int = 0

  def __post_init__(self):
    _set_int(self, 'target_step', 0)

  def is_update_step(self, step):
    return jnp.asarray(step) == self.target_step

  def sparsity(self, step, target):
    return jnp.where(jnp.asarray(step) >= self.target_step, target, 0.0)


@dataclasses.dataclass(frozen=True)
class PeriodicSchedule(_JaxprunerNames):
  """Constant sparsity; masks updated every ``update_freq`` steps in [start, end).

  This is the schedule of dynamic sparse training (SET, RigL). The masks made at ``init``
  are already at the target sparsity.
  """

  update_freq: int = 100
  update_start_step: int = 0
  update_end_step: int | None = None

  def __post_init__(self):
    _set_int(self, 'update_freq', 1)
    _set_int(self, 'update_start_step', 0)
    if self.update_end_step is not None:
      _set_int(self, 'update_end_step', 0)
      if self.update_end_step < self.update_start_step:
        raise ValueError(
          f'update_end_step={self.update_end_step} precedes update_start_step='
          f'{self.update_start_step}; the end must be >= the start.'
        )

  def _in_window(self, step):
    step = jnp.asarray(step)
    ok = step >= self.update_start_step
    if self.update_end_step is not None:
      ok &= step < self.update_end_step
    return ok

  def is_update_step(self, step):
    step = jnp.asarray(step)
    return self._in_window(step) & ((step - self.update_start_step) % self.update_freq == 0)

  def sparsity(self, step, target):
    del step
    return target


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(PeriodicSchedule):
  """Gradual pruning (Zhu & Gupta, 2017): ``s_t = s_f + (s_i - s_f) (1 - p) ** power``.

  ``p = (t - start) / (end - start)``, clipped to [0, 1], is evaluated at the last update
  step ``t <= step``, so the sparsity only changes when the masks are updated: every
  ``update_freq`` steps from ``update_start_step`` (where ``s_t = initial_sparsity``), the
  last update landing at or before ``update_end_step``, where ``s_t`` reaches the target.
  Before the start nothing is pruned.
  """

  update_end_step: int = 1000
  power: float = 3.0
  initial_sparsity: float = 0.0

  def __post_init__(self):
    if self.update_end_step is None:
      raise ValueError(
        'PolynomialSchedule needs update_end_step, an integer > '
        'update_start_step (the step where the target is reached).'
      )
    super().__post_init__()
    if self.update_end_step == self.update_start_step:
      raise ValueError(
        f'PolynomialSchedule: update_end_step={self.update_end_step} equals '
        'update_start_step; the end must be after the start (use '
        'OneShotSchedule to prune at one step).'
      )
    # power <= 0 never reaches the target ((1 - p) ** 0 = 1) or overshoots it to -inf.
    object.__setattr__(
      self, 'power', _checks.number(self.power, 'PolynomialSchedule.power', 0.0, low_open=True)
    )
    object.__setattr__(
      self,
      'initial_sparsity',
      _checks.number(
        self.initial_sparsity, 'PolynomialSchedule.initial_sparsity', 0.0, 1.0, high_open=True
      ),
    )

  def is_update_step(self, step):
    step = jnp.asarray(step)
    in_window = (step >= self.update_start_step) & (step <= self.update_end_step)
    periodic = (step - self.update_start_step) % self.update_freq == 0
    return in_window & (periodic | (step == self.update_end_step))

  def sparsity(self, step, target):
    step = jnp.asarray(step)
    span = max(self.update_end_step - self.update_start_step, 1)
    last = (
      self.update_start_step
      + ((step - self.update_start_step) // self.update_freq) * self.update_freq
    )
    last = jnp.where(step >= self.update_end_step, self.update_end_step, last)
    progress = jnp.clip((last - self.update_start_step) / span, 0.0, 1.0)
    value = target + (self.initial_sparsity - target) * (1.0 - progress) ** self.power
    return jnp.where(step >= self.update_start_step, value, 0.0).astype(jnp.float32)

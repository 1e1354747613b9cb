"""AC/DC: alternating compressed / decompressed training.

Peste et al., 2021 ("AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural
Networks", NeurIPS): after a dense warm-up, training alternates sparse phases, whose mask
is the largest-magnitude weights at the phase's start (top-k at the target sparsity),
and dense phases, where every weight trains again (the pruned ones from zero); the run
ends with one longer sparse phase (fine-tuning). :class:`AlternatingSchedule` says which
phase a step is in; the algorithm is magnitude pruning on that schedule.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from prunax.algorithms.pruners import MagnitudePruning


def _check_step(value, name, minimum):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'AlternatingSchedule {name} must be an integer >= {minimum}, got {value!r}.')


@dataclasses.dataclass(frozen=True)
class AlternatingSchedule:
  """Dense until ``update_start_step``, then phases of ``update_freq`` steps, sparse first,
  alternating with dense ones; sparse from ``update_end_step`` on (None: alternate to the
  end). Masks are recomputed where a sparse phase starts (and set dense where a dense
  phase starts).

  Attributes:
    update_freq: length of every phase, in steps (paper: 5 epochs).
    update_start_step: end of the dense warm-up (paper: 10 epochs).
    update_end_step: start of the final sparse phase (paper: 10 epochs before the end).
  """

  update_freq: int
  update_start_step: int = 0
  update_end_step: int | None = None

  def __post_init__(self):
    _check_step(self.update_freq, 'update_freq', 1)
    _check_step(self.update_start_step, 'update_start_step', 0)
    if self.update_end_step is not None:
      _check_step(self.update_end_step, 'update_end_step', self.update_start_step)

  def is_sparse(self, step):
    """Whether ``step`` is in a sparse (compressed) phase."""
    step = jnp.asarray(step, jnp.int32)
    phase = (step - self.update_start_step) // self.update_freq
    sparse = (step >= self.update_start_step) & (phase % 2 == 0)
    if self.update_end_step is not None:
      sparse |= step >= self.update_end_step
    return sparse

  def is_update_step(self, step):
    return self.is_sparse(step) != self.is_sparse(jnp.asarray(step, jnp.int32) - 1)

  def sparsity(self, step, target):
    return jnp.where(self.is_sparse(step), jnp.float32(target), jnp.float32(0.0))


@dataclasses.dataclass(frozen=True)
class ACDC(MagnitudePruning):
  """Magnitude pruning on an :class:`AlternatingSchedule`."""

  scheduler: object = AlternatingSchedule(update_freq=500, update_start_step=1000)

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.scheduler, AlternatingSchedule):
      raise TypeError(f'ACDC needs an AlternatingSchedule, got {self.scheduler!r}.')

"""Gradient annealing: schedules of the proxy-gradient scale alpha of pruned weights.

AutoSparse (Kundu et al., 2023, "AutoSparse: Towards Automated Sparse Training", section 2)
lets the loss gradient reach pruned weights through the proxy derivative ``alpha`` of the
shrinkage ``h(x) = relu(x)`` (eq. 1) and decays ``alpha`` during training. The paper
updates ``alpha`` once per epoch: with ``steps_per_period`` steps per epoch, period
``i = step // steps_per_period`` and ``T = decay_steps / steps_per_period`` periods,

* ``'constant'``: ``alpha0``
* ``'linear'``: ``alpha0 * (1 - i / T)``
* ``'cosine'`` (eq. 2): ``alpha0 * (1 + cos(pi * i / T)) / 2``
* ``'sigmoid'`` (eq. 3): ``alpha0 * (1 - sigmoid(L0 + (L1 - L0) * i / T))``, L0 = -6, L1 = 6
* ``'sigmoid_cosine'`` (eq. 4): ``alpha0 * max(sigmoid decay, cosine decay)``
* ``'exponential'`` (eq. 9): ``alpha0 * exp(-beta * i)``

``i / T`` is clipped to [0, 1], and from ``zero_at_step`` on alpha is exactly 0 (the
paper's "alpha = 0 @ epoch k", which makes weight gradients as sparse as the forward pass).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ('constant', 'linear', 'cosine', 'sigmoid', 'sigmoid_cosine', 'exponential')
SIGMOID_L0 = -6.0
SIGMOID_L1 = 6.0


@dataclasses.dataclass(frozen=True)
class GradientAnnealing:
  """A schedule of alpha, the gradient scale of pruned weights (callable on the step).

  Attributes:
    kind: one of ``'constant'``, ``'linear'``, ``'cosine'``, ``'sigmoid'``,
      ``'sigmoid_cosine'``, ``'exponential'``.
    alpha0: the initial alpha, in [0, 1].
    decay_steps: steps over which linear/cosine/sigmoid decays run (``T`` times the
      period); required by those kinds.
    steps_per_period: alpha changes only every this many steps (steps per epoch).
    zero_at_step: alpha is 0 from this step on (None: never forced to 0).
    beta: rate of the exponential decay, per period.
  """

  kind: str = 'constant'
  alpha0: float = 1.0
  decay_steps: int | None = None
  steps_per_period: int = 1
  zero_at_step: int | None = None
  beta: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'GradientAnnealing kind must be one of {KINDS}, got {self.kind!r}.')
    if not 0.0 <= self.alpha0 <= 1.0:
      raise ValueError(f'GradientAnnealing alpha0 must be in [0, 1], got {self.alpha0}.')
    if self.kind in ('linear', 'cosine', 'sigmoid', 'sigmoid_cosine'):
      if not isinstance(self.decay_steps, int) or self.decay_steps < 1:
        raise ValueError(f'GradientAnnealing kind {self.kind!r} needs decay_steps, an integer '
                         f'>= 1 (the length of the decay in steps), got {self.decay_steps!r}.')
    if not isinstance(self.steps_per_period, int) or self.steps_per_period < 1:
      raise ValueError('GradientAnnealing steps_per_period must be an integer >= 1, got '
                       f'{self.steps_per_period!r}.')
    if self.zero_at_step is not None and (
        not isinstance(self.zero_at_step, int) or self.zero_at_step < 0):
      raise ValueError('GradientAnnealing zero_at_step must be None or an integer >= 0, got '
                       f'{self.zero_at_step!r}.')
    if self.beta < 0:
      raise ValueError(f'GradientAnnealing beta must be >= 0, got {self.beta}.')

  def __call__(self, step) -> jax.Array:
    """Alpha (float32 scalar) for the update done at ``step`` (may be traced)."""
    step = jnp.asarray(step, jnp.int32)
    period = (step // self.steps_per_period).astype(jnp.float32)
    if self.kind == 'constant':
      decay = jnp.float32(1.0)
    elif self.kind == 'exponential':
      decay = jnp.exp(-self.beta * period)
    else:
      progress = jnp.clip(period * self.steps_per_period / self.decay_steps, 0.0, 1.0)
      cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
      sigmoid = 1.0 - jax.nn.sigmoid(SIGMOID_L0 + (SIGMOID_L1 - SIGMOID_L0) * progress)
      decay = {'linear': 1.0 - progress, 'cosine': cosine, 'sigmoid': sigmoid,
               'sigmoid_cosine': jnp.maximum(sigmoid, cosine)}[self.kind]
    alpha = jnp.float32(self.alpha0) * decay
    if self.zero_at_step is not None:
      alpha = jnp.where(step >= self.zero_at_step, 0.0, alpha)
    return alpha.astype(jnp.float32)


def as_annealing(value: Any, name: str = 'alpha') -> GradientAnnealing:
  """A :class:`GradientAnnealing` from itself, a float (constant) or a mapping of its fields."""
  if isinstance(value, GradientAnnealing):
    return value
  if isinstance(value, Mapping):
    return GradientAnnealing(**value)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return GradientAnnealing('constant', alpha0=float(value))
  raise TypeError(f'{name} must be a float in [0, 1], a prunax.GradientAnnealing or a mapping '
                  f'of its fields, got {value!r}.')

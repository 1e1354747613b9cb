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

from prunax import _checks

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
    _checks.choice(self.kind, 'GradientAnnealing kind', KINDS)
    checked = {
      'alpha0': _checks.number(self.alpha0, 'GradientAnnealing alpha0', 0.0, 1.0),
      'steps_per_period': _checks.integer(
        self.steps_per_period, 'GradientAnnealing steps_per_period', 1
      ),
      'beta': _checks.number(self.beta, 'GradientAnnealing beta', 0.0),
    }
    if self.kind in ('linear', 'cosine', 'sigmoid', 'sigmoid_cosine') or (
      self.decay_steps is not None
    ):
      if self.decay_steps is None:
        raise ValueError(
          f'GradientAnnealing kind {self.kind!r} needs decay_steps, an integer '
          '>= 1 (the length of the decay in steps), got None.'
        )
      checked['decay_steps'] = _checks.integer(
        self.decay_steps, 'GradientAnnealing decay_steps (the length of the decay in steps)', 1
      )
    if self.zero_at_step is not None:
      checked['zero_at_step'] = _checks.integer(
        self.zero_at_step, 'GradientAnnealing zero_at_step (None or a step)', 0
      )
    for field, value in checked.items():
      object.__setattr__(self, field, value)

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
      decay = {
        'linear': 1.0 - progress,
        'cosine': cosine,
        'sigmoid': sigmoid,
        'sigmoid_cosine': jnp.maximum(sigmoid, cosine),
      }[self.kind]
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
  raise TypeError(
    f'{name} must be a float in [0, 1], a prunax.GradientAnnealing or a mapping '
    f'of its fields, got {value!r}.'
  )

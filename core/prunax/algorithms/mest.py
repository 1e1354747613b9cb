"""MEST: drop by weight and gradient magnitude, grow at random.

Yuan et al., 2021 ("MEST: Accurate and Fast Memory-Economic Sparse Training Framework on
the Edge", NeurIPS): sparse training from a random mask whose mask updates ("elastic
mutation") remove the active weights of lowest ``|w| + lambda * |g|``, so a small weight
that still receives a large gradient is kept, and grow as many inactive weights at
random. Everything else (counts, schedule, decaying drop fraction) is :class:`SET`'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prunax import selection
from prunax.algorithms.sparse_trainers import SET


def _weight_plus_gradient(w, g, grad_weight):
  return jnp.abs(w).astype(jnp.float32) + grad_weight * jnp.abs(g).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MEST(SET):
  """SET whose drop score is ``|w| + grad_weight * |g|``.

  Attributes:
    grad_weight: the paper's lambda, the weight of the gradient magnitude (>= 0; 0 is SET).
  """

  grad_weight: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not self.grad_weight >= 0:
      raise ValueError(f'MEST grad_weight must be >= 0, got {self.grad_weight}.')

  def drop_scores(self, params, sparse_state, grads):
    if grads is None:
      raise ValueError('MEST drops by |w| + lambda |g| and needs gradients.')
    weight = jnp.float32(self.grad_weight)
    return jax.tree.map(
      lambda w, g: selection.Lazy(_weight_plus_gradient, w, g, weight), params, grads
    )

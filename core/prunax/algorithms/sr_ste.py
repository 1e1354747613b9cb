"""SR-STE: sparse-refined straight-through estimator for N:M sparsity.

Zhou et al., 2021 ("Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch", eq. 5): the dense weights ``w`` are trained with the gradient taken at the
sparse weights plus a decay on the pruned ones,

    g_w = g(w_sparse) + decay * (1 - mask) * w,

which shrinks pruned weights and so stabilises the N:M masks. ``decay = 0`` is plain STE.
The default structure is 2:4 along the input axis of kernels (axis -2, see
:func:`prunax.sparsity_types.nm_default_axis`), as in the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prunax import _checks
from prunax import sparsity_types
from prunax.algorithms.ste import SteMagnitudePruning
from prunax.base_updater import map_masked


@dataclasses.dataclass(frozen=True)
class SRSTE(SteMagnitudePruning):
  """STE with a decay on pruned weights (N:M by default).

  Attributes:
    sparsity: None (the N:M pattern's ``1 - n/m``) or, for unstructured sparsity, the
      target.
    decay: the refining coefficient lambda_W (paper: 2e-4), >= 0.
  """

  sparsity: float | None = None
  sparsity_type: Any = sparsity_types.NByM(2, 4)
  decay: float = 2e-4

  def __post_init__(self):
    super().__post_init__()
    _checks.assign(self, decay=_checks.number(self.decay, 'SRSTE decay', 0.0))

  def transform_gradients(self, grads, dense, masks, sparse_state):
    del sparse_state
    return map_masked(
      lambda m, g, w: (g + self.decay * jnp.where(m, 0, w)).astype(g.dtype), masks, grads, dense
    )

"""Top-KAST: fixed-budget sparse training with a larger backward set.

Top-KAST (Jayakumar et al., 2020, "Top-KAST: Top-K Always Sparse Training") keeps the
dense weights ``w`` in the optimizer state (an STE-style algorithm). At every step the
forward set A holds the top ``1 - sparsity`` of each leaf by magnitude and the model sees
``w`` under A; the backward set B (A plus the top ``1 - backward_sparsity`` by magnitude)
receives the gradients taken at the sparse weights, and weights outside B receive none.
An L2 penalty of gradient ``penalty * w`` on A and ``penalty / D * w`` on B minus A
(``D`` the forward density of the leaf) pushes the weights that are not active towards
zero, so that the active set settles.

:class:`TopKASTGA` adds gradient annealing on B minus A (the AutoSparse paper's
TopKAST*+GA, section 5.2 and Table 1, where TopKAST* has 0% backward sparsity): the
gradients of the weights in B minus A are scaled by an annealed ``alpha``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prunax import _checks
from prunax import annealing
from prunax import sparsity_types
from prunax.algorithms.ste import SteMagnitudePruning
from prunax.base_updater import map_masked


@dataclasses.dataclass(frozen=True)
class TopKAST(SteMagnitudePruning):
  """Top-KAST: top-k forward set, larger backward set, penalty scaled by inverse density.

  Attributes:
    backward_sparsity: fraction of each leaf (smallest in magnitude) that receives no
      gradient; B always contains A. 0.0 (default) lets every weight learn (TopKAST*).
    penalty: L2 coefficient of the exploration penalty (0 disables it).
    alpha: scale of the gradients of B minus A (1.0 for Top-KAST); a float, a
      :class:`prunax.GradientAnnealing` or a mapping of its fields.
  """

  backward_sparsity: float = 0.0
  penalty: float = 0.0
  alpha: Any = 1.0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 'alpha', annealing.as_annealing(self.alpha))
    _checks.assign(
      self,
      backward_sparsity=_checks.number(
        self.backward_sparsity, 'backward_sparsity', 0.0, 1.0, high_open=True
      ),
      penalty=_checks.number(self.penalty, 'penalty', 0.0),
    )
    if self.sparsity is not None and self.backward_sparsity > self.sparsity:
      raise ValueError(
        f'backward_sparsity={self.backward_sparsity} exceeds sparsity='
        f'{self.sparsity}: the backward set must contain the forward set.'
      )
    if not isinstance(self.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(
        f'{type(self).__name__} supports only unstructured sparsity, got {self.sparsity_type!r}.'
      )

  def backward_masks(self, dense, masks):
    """B: the forward set plus the top ``1 - backward_sparsity`` weights by magnitude.

    One selection for every leaf (per layer of stacked leaves): a selection per leaf, at
    every step, compiled TopKAST's step of 16 layers of 256 x 256 in 6.2 s, 13x dense.
    With ``backward_sparsity`` 0 (TopKAST*), B is every weight and nothing is selected."""
    if self.backward_sparsity == 0.0:
      return map_masked(lambda m, w: jnp.ones(jnp.shape(w), bool), masks, dense)
    axes = self.layer_axes_tree(dense)
    top = self.magnitude_masks(masks, dense, self.backward_sparsity, axes)
    return map_masked(lambda m, w, t: m | t, masks, dense, top)

  def transform_gradients(self, grads, dense, masks, sparse_state):
    alpha = self.alpha(sparse_state.count)

    def grad(m, g, w, b):
      density = jnp.maximum(jnp.mean(m, dtype=jnp.float32), 1.0 / m.size)
      active = g + self.penalty * w
      explore = alpha * g + (self.penalty / density) * w
      return jnp.where(m, active, jnp.where(b, explore, 0)).astype(g.dtype)

    return map_masked(grad, masks, grads, dense, self.backward_masks(dense, masks))


@dataclasses.dataclass(frozen=True)
class TopKASTGA(TopKAST):
  """TopKAST* + gradient annealing: Top-KAST with ``alpha`` annealed on B minus A.

  ``alpha`` is required (a decaying :class:`prunax.GradientAnnealing`, e.g.
  ``GradientAnnealing('sigmoid_cosine', alpha0=0.8, decay_steps=...)``).
  """

  alpha: Any = None

  def __post_init__(self):
    if self.alpha is None:
      raise ValueError(
        'TopKASTGA needs alpha: a prunax.GradientAnnealing (or a mapping of its '
        'fields), e.g. GradientAnnealing("sigmoid_cosine", alpha0=0.8, '
        'decay_steps=1000).'
      )
    super().__post_init__()

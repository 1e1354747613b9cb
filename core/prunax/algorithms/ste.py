"""Straight-through estimator (STE) pruning, and what straight-through training means.

The dense weights live in the optimizer state; the params the model sees are their
projection on a mask recomputed at every step from the dense weights, at the schedule's
sparsity. Gradients taken at the sparse weights update the dense ones (Bengio et al.,
2013; Zhou et al., 2021 for N:M).

:class:`StraightThrough` is that family as a mixin: it selects the straight-through engine
(:func:`prunax.engines.straight_through`), keeps the dense weights as its state
(:class:`DenseWeights`) and holds the hooks its algorithms override (SR-STE, Top-KAST,
AutoSparse).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from prunax import engines
from prunax.algorithms.pruners import MagnitudePruning
from prunax.algorithms.pruners import RandomPruning
from prunax.state import SparseState
from prunax.tree_util import map_masked
from prunax.tree_util import pruned_only
from prunax.tree_util import to_stored

PyTree = Any


class DenseWeights(NamedTuple):
  """State of straight-through algorithms: the dense weights of the pruned leaves
  (``optax.MaskedNode()`` at the others)."""

  dense_params: Any

  params_like = ('dense_params',)


class StraightThrough:
  """Mixin of straight-through algorithms (put it before the algorithm it modifies:
  ``class SteMagnitudePruning(StraightThrough, MagnitudePruning)``).

  The engine runs the wrapped optimizer on the dense weights with the gradients taken at
  the sparse weights, after :meth:`before_update` and :meth:`transform_gradients`, then
  recomputes the masks from the new dense weights (``compute_masks``) and returns the
  updates that take the params to :meth:`forward_params`.
  """

  engine = staticmethod(engines.straight_through)

  def init_algorithm_state(self, params: PyTree, masks: PyTree, targets: PyTree) -> Any:
    """:class:`DenseWeights`: a copy of the pruned params (the state must not share
    buffers with params: train steps donate both)."""
    del targets
    return DenseWeights(to_stored(jax.tree.map(jnp.copy, pruned_only(masks, params))))

  def before_update(
    self,
    algorithm_state: Any,
    grads: PyTree,
    dense: PyTree,
    masks: PyTree,
    sparse_state: SparseState,
    inner: optax.GradientTransformation,
  ) -> tuple[Any, PyTree]:
    """The algorithm's state after the step's gradients, and the gradients the step goes
    on with (unchanged by default).

    Args:
      algorithm_state: the algorithm's state before the step.
      grads: the gradients of this step (taken at the sparse weights).
      dense: the dense weights the forward pass of this step was computed from (params
        for leaves without dense weights).
      masks: the masks of this step.
      sparse_state: the state before the step.
      inner: the wrapped transformation (the weights' optimizer).
    """
    del dense, masks, sparse_state, inner
    return algorithm_state, grads

  def transform_gradients(
    self, grads: PyTree, dense: PyTree, masks: PyTree, sparse_state: SparseState
  ) -> PyTree:
    """Gradients (taken at the sparse weights) fed to the inner optimizer of the dense
    weights; ``sparse_state`` is the state before the step. Identity: the
    straight-through estimator."""
    del dense, masks, sparse_state
    return grads

  def forward_params(self, dense: PyTree, masks: PyTree, sparse_state: SparseState) -> PyTree:
    """The weights the model sees for the pruned leaves: ``dense`` under ``masks``."""
    del sparse_state
    return map_masked(lambda m, d: jnp.where(m, d, 0).astype(d.dtype), masks, dense)


@dataclasses.dataclass(frozen=True)
class SteMagnitudePruning(StraightThrough, MagnitudePruning):
  """STE with magnitude scores ``|w|`` of the dense weights."""


@dataclasses.dataclass(frozen=True)
class SteRandomPruning(StraightThrough, RandomPruning):
  """STE with random scores, redrawn at every step."""

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
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from prunax import engines
from prunax import selection
from prunax import sparsity_types
from prunax.algorithms.pruners import MagnitudePruning
from prunax.algorithms.pruners import RandomPruning
from prunax.state import SparseState
from prunax.tree_util import is_none
from prunax.tree_util import map_masked
from prunax.tree_util import pruned_only
from prunax.tree_util import to_stored

PyTree = Any


class DenseWeights(NamedTuple):
  """State of straight-through algorithms: the dense weights of the pruned leaves
  (``optax.MaskedNode()`` at the others), and, for magnitude STE with unstructured masks
  chosen per leaf, the last thresholds of every pruned leaf (uint32 ``(leaves, 4)``: the
  last step's threshold key and the count it kept, then the step before's; zeros where
  unknown; see :meth:`SteMagnitudePruning.after_masks`), else
  ``optax.MaskedNode()``. Replicated, not sharded: a few bytes per leaf."""

  dense_params: Any
  last_thresholds: Any = optax.MaskedNode()

  params_like = ('dense_params',)


class StraightThrough:
  """Mixin of straight-through algorithms (put it before the algorithm it modifies:
  ``class SteMagnitudePruning(StraightThrough, MagnitudePruning)``).

  The engine runs the wrapped optimizer on the dense weights with the gradients taken at
  the sparse weights, after :meth:`before_update` and :meth:`transform_gradients`, then
  recomputes the masks from the new dense weights (``compute_masks``, then
  :meth:`after_masks`) and returns the updates that take the params to
  :meth:`forward_params`.
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

  def after_masks(self, algorithm_state: Any, masks: PyTree, sparsities: PyTree) -> Any:
    """The algorithm's state once this step's ``masks`` (possibly
    :class:`prunax.selection.Lazy`) are chosen at ``sparsities``; unchanged by default."""
    del masks, sparsities
    return algorithm_state

  def forward_params(self, dense: PyTree, masks: PyTree, sparse_state: SparseState) -> PyTree:
    """The weights the model sees for the pruned leaves: ``dense`` under ``masks``."""
    del sparse_state
    return map_masked(lambda m, d: jnp.where(m, d, 0).astype(d.dtype), masks, dense)


@dataclasses.dataclass(frozen=True)
class SteMagnitudePruning(StraightThrough, MagnitudePruning):
  """STE with magnitude scores ``|w|`` of the dense weights.

  Its masks are selected at every step from weights that moved by one optimizer step, so
  with unstructured masks chosen per leaf, the state keeps every leaf's last two
  thresholds and counts (:class:`DenseWeights`), and the next selection starts its
  search where they lead (``selection.Lazy(near=)``): fewer counting passes, the same
  masks.
  """

  def init_algorithm_state(self, params: PyTree, masks: PyTree, targets: PyTree) -> Any:
    """:class:`DenseWeights`, with a row of zero thresholds per pruned leaf."""
    state = super().init_algorithm_state(params, masks, targets)
    if not self.selects_top_k_per_leaf():
      return state
    leaves = sum(m is not None for m in jax.tree.leaves(masks, is_leaf=is_none))
    return state._replace(last_thresholds=jnp.zeros((leaves, 4), jnp.uint32))

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    """``|w|``, the scores of pruned leaf ``i`` carrying row ``i`` of the last thresholds
    (``selection.Lazy(near=)``) where the state keeps them."""
    scores = super().calculate_scores(params, sparse_state, grads, **kwargs)
    last = None if sparse_state is None else sparse_state.algorithm_state
    if not isinstance(getattr(last, 'last_thresholds', None), jax.Array):
      return scores
    flat, treedef = jax.tree.flatten(sparse_state.masks, is_leaf=is_none)
    rows = iter(range(last.last_thresholds.shape[0]))
    near = [None if m is None else (last.last_thresholds, next(rows)) for m in flat]
    return treedef.unflatten(
      [
        s.with_near(h) if h is not None and isinstance(s, selection.Lazy) else s
        for s, h in zip(treedef.flatten_up_to(scores), near, strict=True)
      ]
    )

  def after_masks(self, algorithm_state: Any, masks: PyTree, sparsities: PyTree) -> Any:
    """Keeps every pruned leaf's threshold key and count, then the last step's
    (:func:`prunax.selection.found_thresholds`; zeros where its mask came from no
    threshold: a stacked leaf's). One table for all leaves: a row each would be a kernel
    each."""
    if not isinstance(algorithm_state.last_thresholds, jax.Array):
      return algorithm_state
    flat, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    pruned = [
      (m, s) for m, s in zip(flat, treedef.flatten_up_to(sparsities), strict=True) if m is not None
    ]
    t = selection.found_thresholds([m for m, _ in pruned])
    sizes = [math.prod(m.shape) for m, _ in pruned]
    kept = selection.once_per_value(
      lambda s, n: n - sparsity_types.num_zeros(s, n), [s for _, s in pruned], sizes
    )
    k = jnp.where(t == 0, jnp.uint32(0), selection.stack_shared(kept, jnp.uint32))
    last = algorithm_state.last_thresholds[:, :2]
    rows = jnp.concatenate([t[:, None], k[:, None], last], axis=1)
    return algorithm_state._replace(last_thresholds=rows)


@dataclasses.dataclass(frozen=True)
class SteRandomPruning(StraightThrough, RandomPruning):
  """STE with random scores, redrawn at every step."""

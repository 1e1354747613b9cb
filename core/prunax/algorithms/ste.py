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
import numpy as np
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
  chosen per leaf, the last thresholds of every pruned leaf (uint32 ``(rows, 4)``, a row
  per leaf and one per layer of a stacked leaf, in leaf order: the last step's threshold
  key and the count it kept, then the step before's; zeros where unknown; see
  :meth:`SteMagnitudePruning.after_masks`), else
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
    """:class:`DenseWeights`, with a row of zero thresholds per pruned leaf (per layer of
    a stacked leaf)."""
    state = super().init_algorithm_state(params, masks, targets)
    if not self.selects_top_k_per_leaf():
      return state
    rows = sum(n for n in self._threshold_rows(params, masks) if n is not None)
    return state._replace(last_thresholds=jnp.zeros((rows, 4), jnp.uint32))

  def _threshold_rows(self, params: PyTree, masks: PyTree) -> list[int | None]:
    """The rows of the last thresholds of every leaf of ``masks`` (flattened, None
    leaves kept): 1 per pruned leaf, one per layer of a stacked leaf (each layer is
    selected on its own), None where not pruned."""
    flat, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    axes = treedef.flatten_up_to(self.layer_axes_tree(params))
    shapes = treedef.flatten_up_to(jax.tree.map(jnp.shape, params))
    return [
      None if m is None else 1 if a is None else shape[a]
      for m, a, shape in zip(flat, axes, shapes, strict=True)
    ]

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    """``|w|``, the scores of every pruned leaf carrying its rows of the last thresholds
    (``selection.Lazy(near=)``: the first of them; a stacked leaf has one per layer,
    in order) where the state keeps them.

    Raises:
      ValueError: if the state's table has not a row per pruned leaf and layer (a state
        of another model, or of a version that kept a row per stacked leaf).
    """
    scores = super().calculate_scores(params, sparse_state, grads, **kwargs)
    last = None if sparse_state is None else sparse_state.algorithm_state
    if not isinstance(getattr(last, 'last_thresholds', None), jax.Array):
      return scores
    table = last.last_thresholds
    counts = self._threshold_rows(params, sparse_state.masks)
    if sum(n for n in counts if n is not None) != table.shape[0]:
      raise ValueError(
        f'{type(self).__name__}: the state keeps {table.shape[0]} rows of last thresholds, '
        f'but the pruned leaves need {sum(n for n in counts if n is not None)} (one per '
        'leaf, one per layer of a stacked leaf); initialize the state from these params '
        '(tx.init(params)).'
      )
    starts = np.cumsum([0] + [n or 0 for n in counts])[:-1]
    treedef = jax.tree.structure(sparse_state.masks, is_leaf=is_none)
    return treedef.unflatten(
      [
        s.with_near((table, int(i))) if n is not None and isinstance(s, selection.Lazy) else s
        for s, n, i in zip(treedef.flatten_up_to(scores), counts, starts, strict=True)
      ]
    )

  def after_masks(self, algorithm_state: Any, masks: PyTree, sparsities: PyTree) -> Any:
    """Keeps every pruned leaf's threshold key and count (every layer's, for a stacked
    leaf), then the last step's (:func:`prunax.selection.found_thresholds`). One table
    for all leaves: a row each would be a kernel each.

    Raises:
      ValueError: if the masks give another number of thresholds than the state keeps
        (stacked leaves' masks of no layers' thresholds)."""
    if not isinstance(algorithm_state.last_thresholds, jax.Array):
      return algorithm_state
    flat, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    pruned = [
      (m, s) for m, s in zip(flat, treedef.flatten_up_to(sparsities), strict=True) if m is not None
    ]
    t = selection.found_thresholds([m for m, _ in pruned])
    if t.shape[0] != algorithm_state.last_thresholds.shape[0]:
      raise ValueError(
        f'{type(self).__name__}: the masks give {t.shape[0]} thresholds (one per leaf and '
        f'layer of a stacked leaf), but the state keeps '
        f'{algorithm_state.last_thresholds.shape[0]} rows; stacked leaves need masks of '
        'their own layers (selection.map_layer_groups(lazy=True)).'
      )
    # A row per layer of a stacked leaf: its layer's size, at the leaf's sparsity.
    rows = []
    for m, s in pruned:
      n = selection.layers_of(m)
      rows += [(s, math.prod(m.shape) // n)] * n
    kept = selection.once_per_value(
      lambda s, n: n - sparsity_types.num_zeros(s, n), [s for s, _ in rows], [n for _, n in rows]
    )
    k = jnp.where(t == 0, jnp.uint32(0), selection.stack_shared(kept, jnp.uint32))
    last = algorithm_state.last_thresholds[:, :2]
    rows = jnp.concatenate([t[:, None], k[:, None], last], axis=1)
    return algorithm_state._replace(last_thresholds=rows)


@dataclasses.dataclass(frozen=True)
class SteRandomPruning(StraightThrough, RandomPruning):
  """STE with random scores, redrawn at every step."""

"""Logical axes of an optimizer state that holds ``prunax.SparseState`` nodes (no t5x needed).

t5x shards every optimizer-state array by the logical axes derived from the params' axes. A
pruner's masks, and the fields of its algorithm's state that its class lists as
``params_like`` (dense weights, gradient momentum), have the params' structure and take their
axes, so they shard exactly like the weights they belong to (packed masks too: only the size
of their last axis differs); the step counter, the random key and the rest of the
algorithm's state (per-layer thresholds and their optimizer state) are replicated.
``optax.adafactor``'s state, which t5x's rules do not know, gets axes here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import prunax
from prunax.tree_util import is_none
from prunax.tree_util import is_unpruned

PyTree = Any


def _like_params(tree: PyTree, params_axes: PyTree) -> PyTree:
  """The params' axes at the leaves of ``tree`` (a tree like params; ``MaskedNode`` where
  a leaf is not pruned, which holds no array and so takes no axes)."""
  if is_unpruned(tree):
    return tree
  return jax.tree.map(
    lambda axes, leaf: leaf if is_unpruned(leaf) else axes, params_axes, tree, is_leaf=is_none
  )


def _algorithm_state_axes(state: PyTree, params_axes: PyTree) -> PyTree:
  """Axes of an algorithm's own state: the params' axes for its ``params_like`` fields
  (see ``prunax.state.params_like_fields``), replicated elsewhere."""
  if is_unpruned(state):
    return state
  like = prunax.state.params_like_fields(state)
  if not hasattr(state, '_fields'):  # not a NamedTuple: nothing declares its layout
    return jax.tree.map(lambda _: None, state)
  return type(state)(
    *[
      _like_params(value, params_axes) if name in like else jax.tree.map(lambda _: None, value)
      for name, value in zip(state._fields, state, strict=True)
    ]
  )


def _factored_logical_axes(state: optax.FactoredState, params_axes: PyTree) -> PyTree:
  """Axes of ``optax.adafactor``'s second moments (t5x's rules have no entry for them).

  ``v`` holds a full second moment for a param that is not factored (every 1-D param, and
  any whose two largest dimensions are not both ``min_dim_size_to_factor`` or more): it
  takes the param's axes. A factored param keeps a ``(1,)`` placeholder in ``v`` (fewer
  dimensions than the param: replicated) and row and column means in ``v_row`` and
  ``v_col``, which are replicated: one dimension fewer than the param, and small.
  """

  def full(axes, v):
    if axes is None or v is None or isinstance(v, optax.MaskedNode):
      return None
    return axes if len(jax.numpy.shape(v)) == len(axes) else None

  return optax.FactoredState(
    count=None,
    v_row=jax.tree.map(lambda _: None, state.v_row),
    v_col=jax.tree.map(lambda _: None, state.v_col),
    v=jax.tree.map(full, params_axes, state.v, is_leaf=is_none),
  )


def sparse_state_logical_axes(
  state: PyTree,
  params_axes: PyTree,
  inner_axes_fn: Callable[[PyTree, PyTree], PyTree],
) -> PyTree:
  """Logical axes for ``state``, a ``prunax.SparseState`` or an ``optax.chain`` state of them.

  Args:
    state: the optimizer state (or a tree of the same structure).
    params_axes: the params' logical axes (e.g. ``PartitionSpec`` leaves).
    inner_axes_fn: gives the axes of any other optax state, called as
      ``inner_axes_fn(state, params_axes)``; in t5x,
      ``OptaxStatePartitionRules.derive_optax_logical_axes``.

  Returns:
    A tree like ``state`` with an axes leaf (or None: replicated) per array.
  """
  if isinstance(state, prunax.SparseState):
    return prunax.SparseState(
      inner_state=sparse_state_logical_axes(state.inner_state, params_axes, inner_axes_fn),
      masks=_like_params(state.masks, params_axes),
      count=None,
      rng=None,
      algorithm_state=_algorithm_state_axes(state.algorithm_state, params_axes),
    )
  if isinstance(state, optax.FactoredState):  # optax.adafactor
    return _factored_logical_axes(state, params_axes)
  if type(state) in (tuple, list):  # the state of optax.chain
    return type(state)(sparse_state_logical_axes(s, params_axes, inner_axes_fn) for s in state)
  return inner_axes_fn(state, params_axes)

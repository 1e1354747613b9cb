"""The optimizer state of a wrapped transformation, and how to find it in a nested state."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import optax

from prunax import masks as masks_lib

PyTree = Any


class SparseState(NamedTuple):
  """Optimizer state of a wrapped transformation.

  It holds arrays only: a leaf that is not pruned, and an algorithm without state of its
  own, is an ``optax.MaskedNode()`` (an empty node, as in ``optax.masked`` states), never
  ``None``, so every checkpointer (orbax, t5x, flax serialization) saves and restores it.

  Attributes:
    inner_state: state of the wrapped optax transformation.
    masks: tree like params; 1-bit keep-masks packed along the last axis (by
      :func:`prunax.masks.pack_mask`, in byte blocks that shard like the param) or one
      uint8 per weight with ``packed_masks=False``; ``MaskedNode()`` for leaves that are
      not pruned.
    count: int32 number of updates done.
    rng: uint32 PRNG key data of shape (2,) (the key is folded with ``count`` when used).
    algorithm_state: the algorithm's own state, a ``NamedTuple`` its class defines (e.g.
      the dense weights of straight-through algorithms, :class:`prunax.algorithms.ste.
      DenseWeights`; AutoSparse's thresholds; SNFS's gradient momentum), or
      ``MaskedNode()`` for algorithms that keep none. Its fields named in the class's
      ``params_like`` are trees like the params (``MaskedNode()`` at leaves that are not
      pruned), which hosts shard like the params; the other fields are replicated.
  """

  inner_state: Any
  masks: Any
  count: jax.Array
  rng: jax.Array
  algorithm_state: Any = optax.MaskedNode()


def params_like_fields(algorithm_state: Any) -> tuple[str, ...]:
  """Names of the fields of ``algorithm_state`` that are trees like the params."""
  return tuple(getattr(type(algorithm_state), 'params_like', ()))


def get_sparse_state(opt_state: PyTree) -> SparseState:
  """Finds the (first) :class:`SparseState` inside a nested optimizer state."""
  found = []

  def visit(x):
    if isinstance(x, SparseState) and not found:
      found.append(x)
    return isinstance(x, SparseState)

  jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
  if not found:
    raise ValueError(
      'No prunax SparseState found in the optimizer state; was the optimizer '
      'built with updater.wrap_optax(...)?'
    )
  return found[0]


def bool_masks(opt_state: PyTree, params: PyTree) -> PyTree:
  """Boolean keep-masks of the :class:`SparseState` in ``opt_state`` (None: dense leaf)."""
  return masks_lib.unpack_masks(get_sparse_state(opt_state).masks, params)

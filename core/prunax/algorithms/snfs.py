"""SNFS: sparse momentum (sparse networks from scratch).

Dettmers & Zettlemoyer, 2019 ("Sparse Networks from Scratch: Faster Training without
Losing Performance"), as their ``sparse_learning`` code does it. Sparse training from a
random mask; the updater keeps a momentum of the dense gradients,
``m <- beta * m + g`` (the buffer of SGD with momentum, which their code reads), and at
every mask update:

1. each leaf removes ``ceil(f * n_l)`` of its ``n_l`` active weights, those of smallest
   magnitude (``f``: the prune rate, cosine-decayed to 0 at the schedule's end);
2. the removed total is redistributed over the leaves in proportion to each leaf's mean
   ``|m|`` over its active weights (a leaf receives at most as many as it has free
   positions; what does not fit goes to the other leaves);
3. each leaf regrows its share at the inactive positions of largest ``|m|``, at zero.

Per-leaf densities therefore change over training; the total count of active weights
does not. The masks are computed on full arrays (it is a per-update cost, not per step).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from prunax import selection
from prunax.algorithms.sparse_trainers import SET
from prunax.tree_util import from_stored
from prunax.tree_util import is_none
from prunax.tree_util import map_masked
from prunax.tree_util import to_stored


def _where(condition, x, y) -> selection.Lazy:
  """``jnp.where(condition, x, y)`` as :class:`prunax.selection.Lazy` scores (computed in
  each counting pass, not stored)."""
  return selection.Lazy(jnp.where, condition, x, y)


def _abs(x) -> selection.Lazy:
  return selection.Lazy(jnp.abs, x)


def redistribute(total: jax.Array, shares: jax.Array, capacity: jax.Array) -> jax.Array:
  """Integer counts summing to ``total``, in proportion to ``shares``, each <= capacity.

  Rounds of proportional floors among the leaves with room left, then the rest greedily
  in order of share (as the reference, which loops until everything is placed).

  Args:
    total: int32 count to hand out (at most ``capacity.sum()``).
    shares: float32 weights per leaf (non-negative).
    capacity: int32 room per leaf.

  Returns:
    int32 counts per leaf.
  """

  # Loops over the leaves (lax.fori_loop): unrolled in Python, they traced and compiled
  # 2 * len(capacity) steps, and a scatter per leaf in the second.
  def proportional(_, carry):
    alloc, remaining = carry
    room = capacity - alloc
    weights = jnp.where(room > 0, shares, 0.0)
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    add = jnp.minimum(jnp.floor(weights * remaining.astype(jnp.float32)).astype(jnp.int32), room)
    return alloc + add, remaining - jnp.sum(add)

  order = jnp.argsort(-shares)

  def greedy(rank, carry):
    alloc, remaining = carry
    i = order[rank]
    add = jnp.minimum(capacity[i] - alloc[i], remaining)
    return alloc.at[i].add(add), remaining - add

  start = (jnp.zeros_like(capacity), jnp.asarray(total, jnp.int32))
  carry = jax.lax.fori_loop(0, len(capacity), proportional, start)
  alloc, _ = jax.lax.fori_loop(0, len(capacity), greedy, carry)
  return alloc


class SnfsState(NamedTuple):
  """SNFS's state: the momentum of the dense gradients of the pruned leaves (float32)."""

  momentum: Any

  params_like = ('momentum',)


@dataclasses.dataclass(frozen=True)
class SNFS(SET):
  """Sparse momentum: magnitude pruning, momentum-based redistribution and growth.

  Attributes:
    drop_fraction: the prune rate (reference default 0.5).
    momentum: the gradient momentum's coefficient ``beta`` (reference: SGD's 0.9).
  """

  drop_fraction: float = 0.5
  momentum: float = 0.9

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f'SNFS momentum must be in [0, 1), got {self.momentum}.')

  def init_algorithm_state(self, params, masks, targets):
    zeros = map_masked(lambda m, p: jnp.zeros(jnp.shape(p), jnp.float32), masks, params)
    return SnfsState(to_stored(zeros))

  def update_algorithm_state(self, algorithm_state, grads, masks):
    momentum = jax.tree.map(
      lambda m, g: None if m is None else self.momentum * m + g.astype(jnp.float32),
      from_stored(algorithm_state.momentum),
      grads,
      is_leaf=is_none,
    )
    return SnfsState(to_stored(momentum))

  def compute_masks(self, params, sparsities, sparse_state=None, grads=None, old_masks=None):
    if sparse_state is None or old_masks is None:
      return super().compute_masks(params, sparsities, sparse_state, grads, old_masks)
    fraction = self.drop_fraction_at(sparse_state.count)
    flat_old, treedef = jax.tree.flatten(old_masks, is_leaf=is_none)
    flat_w = treedef.flatten_up_to(params)
    flat_m = treedef.flatten_up_to(from_stored(sparse_state.algorithm_state.momentum))
    pruned = [i for i, m in enumerate(flat_old) if m is not None]
    olds = [selection.materialize(flat_old[i]) for i in pruned]
    n_old = [jnp.sum(old, dtype=jnp.int32) for old in olds]
    removed = [jnp.ceil(fraction * n.astype(jnp.float32)).astype(jnp.int32) for n in n_old]
    # One selection loop drops from every leaf and one grows in every leaf (a loop per
    # leaf, as topk_mask of each, compiled in 58 s at 64 layers of 256 x 256: 55x dense).
    kept = selection.topk_masks(
      [_where(old, _abs(flat_w[i]), -jnp.inf) for i, old in zip(pruned, olds, strict=True)],
      [n - r for n, r in zip(n_old, removed, strict=True)],
    )
    stats = jnp.stack(
      [
        jnp.sum(jnp.where(old, jnp.abs(flat_m[i]), 0.0)) / jnp.maximum(n, 1)
        for i, old, n in zip(pruned, olds, n_old, strict=True)
      ]
    )
    capacity = [old.size - (n - r) for old, n, r in zip(olds, n_old, removed, strict=True)]
    removed = jnp.stack(removed)
    # Without momentum yet (all zero), every leaf regrows what it removed.
    shares = jnp.where(jnp.sum(stats) > 0, stats, removed.astype(jnp.float32))
    grow = redistribute(jnp.sum(removed), shares, jnp.stack(capacity).astype(jnp.int32))
    grown = selection.topk_masks(
      [_where(keep, -jnp.inf, _abs(flat_m[i])) for i, keep in zip(pruned, kept, strict=True)],
      [grow[j] for j in range(len(pruned))],
    )
    out = list(flat_old)
    for i, keep, g in zip(pruned, kept, grown, strict=True):
      out[i] = keep | g
    return treedef.unflatten(out)

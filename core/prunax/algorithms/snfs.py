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
does not. Every layer of a stacked (scanned) leaf is a tensor of its own, as each module's
is in the reference: it drops its own share, and the redistribution runs over every
(leaf, layer), so a scanned model gets the masks of its unrolled form.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunax import _xla_workarounds
from prunax import selection
from prunax.algorithms.sparse_trainers import SET
from prunax.algorithms.sparse_trainers import active_score
from prunax.algorithms.sparse_trainers import inactive_score
from prunax.masks import lazy_mask
from prunax.masks import pack_masks
from prunax.tree_util import apply_to_pruned
from prunax.tree_util import from_stored
from prunax.tree_util import is_none
from prunax.tree_util import map_masked
from prunax.tree_util import to_stored


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

  def compute_lazy_masks(
    self, params, sparsities, sparse_state=None, grads=None, old_masks=None, **kwargs
  ):
    if sparse_state is None or old_masks is None:  # instant_sparsify: plain magnitude.
      return super().compute_lazy_masks(
        params, sparsities, sparse_state, grads, old_masks, **kwargs
      )
    fraction = self.drop_fraction_at(sparse_state.count)
    return apply_to_pruned(
      functools.partial(_drop_redistribute_grow, fraction),
      old_masks,
      old_masks,
      params,
      from_stored(sparse_state.algorithm_state.momentum),
      self.layer_axes_tree(params),
    )


def _num_layers(shape, axis: int | None) -> int:
  """The layers of a leaf of ``shape``: its size along the layer ``axis``, 1 without one."""
  return 1 if axis is None else shape[axis]


def _layer_sums(old, momentum, *, axis):
  """Per layer (along ``axis``; the whole array when None): the active count and the sum
  of ``|momentum|`` over the active weights."""
  layers = _num_layers(old.shape, axis)
  if axis is not None:
    old, momentum = jnp.moveaxis(old, axis, 0), jnp.moveaxis(momentum, axis, 0)
  old, momentum = old.reshape(layers, -1), momentum.reshape(layers, -1)
  # Neither sum stores what it reads (a plain float sum stored the masked |momentum|).
  return (
    _xla_workarounds.count_true(old),
    jax.vmap(_xla_workarounds.fused_sum)(jnp.where(old, jnp.abs(momentum), 0.0)),
  )


def _leaf_counts(counts: jax.Array, ws, axes) -> list:
  """The per-layer entries of ``counts`` (one per (leaf, layer), in leaf then layer order)
  for every leaf, shaped to be sliced by :func:`selection.map_layer_groups` along its layer
  axis (a scalar for a leaf without one). Rows are read by ``leaf_row``, so the kernels
  reading them are alike for alike leaves."""
  _xla_workarounds.split_rows(counts)
  out, start = [], 0
  for w, a in zip(ws, axes, strict=True):
    if a is None:
      out.append(_xla_workarounds.leaf_row(counts, start))
      start += 1
      continue
    layers = _num_layers(w.shape, a)
    rows = jnp.stack([_xla_workarounds.leaf_row(counts, start + j) for j in range(layers)])
    out.append(rows.reshape([layers if d == a else 1 for d in range(w.ndim)]))
    start += layers
  return out


def _drop_redistribute_grow(fraction, olds, ws, ms, axes) -> list:
  """SNFS's new masks of the pruned leaves (old masks ``olds``, weights ``ws``, momenta
  ``ms``, layer ``axes``): every layer of a stacked leaf is a tensor of its own, as each
  module's is in the reference."""
  # Per (leaf, layer), in leaf then layer order: active count and sum of |m| over the
  # active weights (alike leaves computed together, one kernel per group).
  n_old, sums = selection.concat_alike(
    lambda r: r,
    [
      selection.Lazy(functools.partial(_layer_sums, axis=a), o, m)
      for o, m, a in zip(olds, ms, axes, strict=True)
    ],
  )
  removed = jnp.ceil(fraction * n_old.astype(jnp.float32)).astype(jnp.int32)
  keep = n_old - removed

  def drop(olds, ws, ks):
    masks = selection.topk_masks(
      [selection.Lazy(active_score, o, _abs(w)) for o, w in zip(olds, ws, strict=True)],
      [jnp.reshape(k, ()) for k in ks],
      lazy=True,
    )
    return pack_masks(masks)  # only the kept masks' bits leave the selection

  # One selection loop drops from every leaf (and layer), one grows in every leaf.
  packed = selection.map_layer_groups(drop, axes, olds, ws, _leaf_counts(keep, ws, axes))
  kept = [lazy_mask(p, w.shape) for p, w in zip(packed, ws, strict=True)]
  # Redistribution over every (leaf, layer).
  stats = sums / jnp.maximum(n_old, 1)
  layer_counts = [_num_layers(w.shape, a) for w, a in zip(ws, axes, strict=True)]
  sizes = np.concatenate(
    [np.full(n, w.size // n) for w, n in zip(ws, layer_counts, strict=True)]
  ).astype(np.int32)
  # Without momentum yet (all zero), every layer regrows what it removed.
  shares = jnp.where(jnp.sum(stats) > 0, stats, removed.astype(jnp.float32))
  grow = redistribute(jnp.sum(removed), shares, jnp.asarray(sizes) - keep)

  def regrow(kept, ms, gs):
    grown = selection.topk_masks(
      [selection.Lazy(inactive_score, k, _abs(m)) for k, m in zip(kept, ms, strict=True)],
      [jnp.reshape(g, ()) for g in gs],
      lazy=True,
    )
    return [selection.Lazy(jnp.logical_or, k, g) for k, g in zip(kept, grown, strict=True)]

  return selection.map_layer_groups(regrow, axes, kept, ms, _leaf_counts(grow, ws, axes))

"""Exact, linear-time top-k selection on scores.

A full sort of every tensor is the usual way to compute a top-k mask, and the usual
reason pruning libraries are slow. Here the k-th largest score is found by a radix-style
threshold search on the scores' order-preserving unsigned-integer keys: each pass counts,
for ``2**bits_per_pass - 1`` candidate thresholds at once, how many keys lie at or above
them, fixing ``bits_per_pass`` bits of the threshold. 32-bit keys need
``32 / bits_per_pass`` read-only passes, so the work is linear in the number of scores.

Ties are broken deterministically by position: among scores equal to the threshold the
ones with the lowest flat (row-major) index are kept, and for several tensors
(:func:`global_topk_masks`) the leaves are taken in pytree order. The tie pass (a cumulative
sum) only runs when the threshold value is shared by more elements than are needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Bits of the threshold fixed per counting pass: 8 passes of 15 comparisons each.
BITS_PER_PASS = 4


def sortable_keys(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (NaN sorts above +inf).

  Args:
    scores: a floating-point array (any float dtype; it is cast to float32).

  Returns:
    A uint32 array of the same shape whose unsigned order equals the float order.
  """
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  sign = bits >> 31
  # Negative floats: flip all bits; non-negative floats: set the sign bit.
  return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_largest_key(keys: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Largest uint32 ``t`` with ``sum(count(key >= t)) >= k`` over all arrays.

  For ``1 <= k <= n`` this is the k-th largest key.  Counts are int32, so the total
  number of elements must stay below 2**31.
  """
  nsteps = 2**BITS_PER_PASS - 1
  steps = jnp.arange(1, nsteps + 1, dtype=jnp.uint32)
  t = jnp.uint32(0)
  for shift in range(32 - BITS_PER_PASS, -1, -BITS_PER_PASS):
    pivots = t + (steps << shift)
    counts = sum(
        jnp.sum(key.reshape(-1)[None, :] >= pivots[:, None], axis=1, dtype=jnp.int32)
        for key in keys)
    # counts is non-increasing in the pivot: the number of pivots still reaching k
    # is the next digit of the threshold.
    digit = jnp.sum(counts >= k, dtype=jnp.uint32)
    t = t + (digit << shift)
  return t


def _tie_break(keys: Sequence[jax.Array], t: jax.Array, k: jax.Array) -> list[jax.Array]:
  """Boolean masks keeping keys > t and the first ``k - count(> t)`` keys equal to t."""
  n_above = sum(jnp.sum(key > t, dtype=jnp.int32) for key in keys)
  n_equal = sum(jnp.sum(key == t, dtype=jnp.int32) for key in keys)
  needed = k - n_above

  def all_ties(keys):
    return [key >= t for key in keys]

  def first_ties(keys):
    masks, offset = [], jnp.int32(0)
    for key in keys:
      eq = (key == t).reshape(-1)
      rank = jnp.cumsum(eq, dtype=jnp.int32) + offset
      offset = offset + jnp.sum(eq, dtype=jnp.int32)
      keep = (key > t).reshape(-1) | (eq & (rank <= needed))
      masks.append(keep.reshape(key.shape))
    return masks

  return jax.lax.cond(needed >= n_equal, all_ties, first_ties, list(keys))


def _clip_count(k, n: int) -> jax.Array:
  return jnp.clip(jnp.asarray(k, jnp.int32), 0, n)


def topk_mask(scores: jax.Array, k) -> jax.Array:
  """Boolean mask of exactly ``k`` largest entries of ``scores`` (ties: lowest index).

  Args:
    scores: array of scores (any shape, floating point).
    k: number of entries to keep; a Python int or a traced int scalar. Clipped to
      ``[0, scores.size]``.

  Returns:
    A bool array of ``scores.shape`` with exactly ``clip(k, 0, size)`` True entries.
  """
  return global_topk_masks([scores], k)[0]


def global_topk_masks(scores: Sequence[jax.Array], k) -> list[jax.Array]:
  """Boolean masks keeping exactly ``k`` largest scores across several arrays.

  One threshold is shared by all arrays (global pruning). Nothing is concatenated, so
  the extra memory is one boolean mask per array.

  Args:
    scores: a sequence of float arrays.
    k: total number of entries to keep (int or traced int scalar).

  Returns:
    A list of bool masks, one per input array.
  """
  n = sum(int(s.size) for s in scores)
  k = _clip_count(k, n)
  keys = [sortable_keys(s) for s in scores]
  t = _kth_largest_key(keys, jnp.maximum(k, 1))
  masks = _tie_break(keys, t, k)
  return [jnp.where(k > 0, m, False) for m in masks]


def n_by_m_mask(scores: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
  """Keeps the ``n`` largest of every ``m`` consecutive scores along ``axis``.

  The rank of each score in its group comes from pairwise comparisons (``m`` per
  element, no sort), ties broken by the lower position in the group.

  Args:
    scores: float array whose ``axis`` dimension is divisible by ``m``.
    n: entries kept per group, ``0 <= n <= m``.
    m: group size.
    axis: the axis along which groups are formed.

  Returns:
    A bool mask of ``scores.shape`` with exactly ``n`` True entries per group.
  """
  moved = jnp.moveaxis(scores, axis, -1)
  size = moved.shape[-1]
  groups = sortable_keys(moved).reshape(moved.shape[:-1] + (size // m, m))
  a = groups[..., :, None]  # the element whose rank is computed
  b = groups[..., None, :]  # every other element of its group
  earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
  beats = (b > a) | ((b == a) & earlier)
  rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  keep = (rank < n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)

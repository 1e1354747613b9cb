"""Exact, linear-time top-k selection on scores.

A full sort of every tensor is the usual way to compute a top-k mask, and the usual
reason pruning libraries are slow. Here the k-th largest score is found by a threshold
search on the scores' order-preserving uint32 keys (:func:`sortable_keys`) that only
counts: every pass reads the scores once and returns, for 5 candidate thresholds at once,
how many keys lie at or above each (5 counts are packed in 6-bit fields of one uint32
per row of 32 elements, so a pass costs about one read of the scores). The thresholds
of the first pass are quantiles of a small strided sample; later passes interpolate
between the two bracketing counts and also bisect the rest of the bracket, so the bracket
at least halves every pass (at most 33 passes for 32-bit keys) and usually closes in 4 to
8. The search stops as soon as a threshold keeps exactly ``k`` keys; nothing is sorted
but the sample, and there is no cumulative sum.

Ties are broken deterministically by position: among scores equal to the threshold the
ones with the lowest flat (row-major) index are kept, and for several tensors
(:func:`global_topk_masks`) the leaves are taken in pytree order. That case (the threshold
value is shared by more elements than are needed) runs a second search of the same kind on
the positions of the tied elements: no cumulative sum, no sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Counting passes: 5 thresholds per pass, each count held in 6 bits of a uint32, summed
# over rows of 32 elements (so a field never overflows; XLA fuses reductions this short
# into the pass instead of writing a full-size intermediate).
_ROW = 32
_FIELD_BITS = 6
# Size of the strided sample whose quantiles give the first pass's thresholds.
_SAMPLE = 2048
_MAX_KEY = 0xFFFFFFFF


class Lazy:
  """Scores given as an elementwise function of arrays, recomputed where they are read.

  ``Lazy(jnp.abs, w)`` stands for ``jnp.abs(w)``. Selection recomputes it in every counting
  pass instead of storing it, so scoring adds no full-size array to a step's memory (XLA
  keeps values used across loop iterations in memory; the arguments are buffers already).
  It is not a pytree, so it is a leaf of a scores tree.

  Attributes:
    fn: elementwise function of ``args`` returning the scores (shape of ``args[0]``).
    args: the arrays ``fn`` reads.
  """

  def __init__(self, fn: Callable[..., jax.Array], *args: jax.Array):
    self.fn = fn
    self.args = args

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(jnp.shape(self.args[0]))

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __call__(self) -> jax.Array:
    return self.fn(*self.args)

  def strided_sample(self, stride: int) -> jax.Array:
    """Scores of every ``stride``-th element (flat order), computed from sliced arguments.

    Arguments of the scores' shape are sliced before ``fn`` runs, so no full-size array
    is formed. For a position-dependent ``fn`` (a hash of the index) this is another
    sample of the same distribution, which is all the search's first guess needs.
    """
    shape = self.shape
    args = [a.reshape(-1)[::stride] if tuple(jnp.shape(a)) == shape else a for a in self.args]
    return self.fn(*args).reshape(-1)

  def __repr__(self):
    return f'Lazy({getattr(self.fn, "__name__", self.fn)}, shape={self.shape})'


def _mix32(x: jax.Array) -> jax.Array:
  # "lowbias32" integer hash (C. Wellons): a bijection of uint32 with good avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_uniform(like: jax.Array, key_data: jax.Array) -> jax.Array:
  """Uniform [0, 1) float32 scores of ``like``'s shape from a counter-based hash.

  Each element's score is a hash of its flat index and the two words of ``key_data``
  (uint32[2]), so it costs a few integer operations per element and fuses into the
  selection passes (see :class:`Lazy`), unlike a stored ``jax.random.uniform`` draw.

  Args:
    like: array whose shape the scores take (its values are not read).
    key_data: uint32[2] key words.

  Returns:
    float32 array of ``like``'s shape, multiples of 2**-24 in [0, 1).
  """
  shape = jnp.shape(like)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  key_data = jnp.asarray(key_data, jnp.uint32)
  h = _mix32(_mix32(index ^ key_data[0]) + key_data[1])
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def materialize(scores):
  """The array of ``scores`` (a :class:`Lazy` is evaluated; arrays pass through)."""
  return scores() if isinstance(scores, Lazy) else scores


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


def _count_at_least(keys: jax.Array, pivots: jax.Array) -> jax.Array:
  """int32 counts ``[sum(keys >= p) for p in pivots]`` for ``len(pivots) <= 5``, one pass."""
  flat = keys.reshape(-1)
  main = (flat.size // _ROW) * _ROW
  counts = jnp.zeros(pivots.shape, jnp.int32)
  if main:
    rows = flat[:main].reshape(-1, _ROW)
    packed = sum((rows >= pivots[i]).astype(jnp.uint32) << (_FIELD_BITS * i)
                 for i in range(len(pivots)))
    per_row = jnp.sum(packed, axis=1, dtype=jnp.uint32)
    field = (1 << _FIELD_BITS) - 1
    counts += jnp.stack([jnp.sum(((per_row >> (_FIELD_BITS * i)) & field).astype(jnp.int32))
                         for i in range(len(pivots))])
  if flat.size > main:
    counts += jnp.sum(flat[main:, None] >= pivots[None, :], axis=0, dtype=jnp.int32)
  return counts


def _narrow(bracket, pivots, counts, k):
  """New ``(lo, hi, c_lo, c_hi)`` from the counts at sorted ``pivots`` in ``(lo, hi]``."""
  lo, hi, c_lo, c_hi = bracket
  reach = counts >= k  # non-increasing along the pivots
  n_reach = jnp.sum(reach, dtype=jnp.int32)
  last = jnp.maximum(n_reach - 1, 0)
  lo, c_lo = (jnp.where(n_reach > 0, pivots[last], lo), jnp.where(n_reach > 0, counts[last], c_lo))
  first = jnp.minimum(n_reach, len(pivots) - 1)
  short = n_reach < len(pivots)
  hi, c_hi = (jnp.where(short, pivots[first] - 1, hi), jnp.where(short, counts[first], c_hi))
  return lo, hi, c_lo, c_hi


def _interpolated_pivots(bracket, k) -> jax.Array:
  """5 sorted thresholds in ``(lo, hi]``: the linear interpolation of the counts, two
  around it, and the midpoints of the two outer parts (so every part is at most half)."""
  lo, hi, c_lo, c_hi = bracket
  inside = (c_lo - c_hi).astype(jnp.float32)
  guess = (c_lo - k).astype(jnp.float32) / inside + 0.5 / inside
  spread = jnp.clip(2.0 / jnp.sqrt(inside), 0.5 / inside, 0.25)
  low, high = jnp.clip(guess - spread, 0.0, 1.0), jnp.clip(guess + spread, 0.0, 1.0)
  fractions = jnp.stack([0.5 * low, low, jnp.clip(guess, low, high), high, 0.5 * (1.0 + high)])
  width = (hi - lo).astype(jnp.float32)
  offsets = jnp.minimum(fractions * width, 4294967040.0).astype(jnp.uint32)
  return lo + jnp.clip(offsets, 1, hi - lo)


def _sample_pivots(inputs: Sequence[Lazy], k, n: int) -> jax.Array:
  """5 sorted thresholds from quantiles of a strided sample, around the k-th largest."""
  stride = max(1, n // _SAMPLE)
  sample = jnp.sort(jnp.concatenate([sortable_keys(x.strided_sample(stride)) for x in inputs]))
  s = sample.size
  # Descending rank k among n -> ascending position in the sample, +-0.5 and 2 sigma.
  q = (1.0 - k.astype(jnp.float32) / n) * s
  sigma = jnp.sqrt(jnp.maximum(q * (1.0 - q / s), 1.0))
  positions = q + sigma * jnp.array([-2.5, -0.75, 0.0, 0.75, 2.5])
  return sample[jnp.clip(jnp.round(positions).astype(jnp.int32), 0, s - 1)]


def _search(inputs, key_fn, k, n: int, sample: bool = True):
  """``(t, c_t, c_above)`` with ``t`` the k-th largest key (or any key keeping exactly ``k``).

  ``key_fn(i, x)`` gives the uint32 keys of ``inputs[i]``; they are recomputed in every
  pass. With ``sample``, the first guess comes from a sample of the inputs' scores (so
  ``key_fn`` must be ``sortable_keys`` of the :class:`Lazy` scores).
  ``c_t = count(key >= t)`` and ``c_above = count(key > t)``; either ``c_t == k`` or ``t``
  is the k-th largest key itself, shared by several keys. Counts are int32: ``n`` must be
  below 2**31.
  """

  def counts(pivots):
    return sum(_count_at_least(key_fn(i, x), pivots) for i, x in enumerate(inputs))

  def step(bracket, pivots):
    lo, hi = bracket[0], bracket[1]
    pivots = jnp.clip(pivots, jnp.minimum(lo + 1, hi), hi)
    return _narrow(bracket, pivots, counts(pivots), k)

  def open_(bracket):
    lo, hi, c_lo, _ = bracket
    return (lo != hi) & (c_lo != k)

  bracket = (jnp.uint32(0), jnp.uint32(_MAX_KEY), jnp.int32(n), jnp.int32(0))
  if sample:
    pivots = _sample_pivots(inputs, k, n)
    bracket = jax.lax.cond(open_(bracket), step, lambda b, _: b, bracket, pivots)
  bracket = jax.lax.while_loop(
      open_, lambda b: step(b, _interpolated_pivots(b, k)), bracket)
  lo, _, c_lo, c_hi = bracket
  return lo, c_lo, c_hi


def _topk_masks(inputs: list[Lazy], k, n: int) -> list[jax.Array]:
  """Masks of the k largest scores (``1 <= k <= n``), ties kept by lowest position."""
  offsets = [0]
  for x in inputs:
    offsets.append(offsets[-1] + x.size)

  def score_keys(i, x):
    del i
    return sortable_keys(x())

  t, c_t, c_above = _search(inputs, score_keys, k, n)

  def at_least(inputs):
    return [score_keys(i, x) >= t for i, x in enumerate(inputs)]

  def first_ties(inputs):
    # Among the keys equal to t, keep the k - c_above of lowest position: a second search
    # on distinct keys that are larger for earlier positions (and 0 off the tie).
    def tie_keys(i, x):
      position = jnp.arange(offsets[i], offsets[i + 1], dtype=jnp.uint32).reshape(x.shape)
      return jnp.where(score_keys(i, x) == t, jnp.uint32(_MAX_KEY) - position, 0)

    # No sample for this search: sampling position-dependent keys would store them all.
    t_tie, _, _ = _search(inputs, tie_keys, k - c_above, n, sample=False)
    return [(score_keys(i, x) > t) | (tie_keys(i, x) >= t_tie) for i, x in enumerate(inputs)]

  # The branches close over the inputs: their arguments (buffers) become the operands.
  return jax.lax.cond(c_t == k, lambda: at_least(inputs), lambda: first_ties(inputs))


def _clip_count(k, n: int) -> jax.Array:
  return jnp.clip(jnp.asarray(k, jnp.int32), 0, n)


def topk_mask(scores: jax.Array | Lazy, k, *,
              score_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Boolean mask of exactly ``k`` largest entries of ``scores`` (ties: lowest index).

  Args:
    scores: array of scores (any shape, floating point), or a :class:`Lazy` of them.
    k: number of entries to keep; a Python int or a traced int scalar. Clipped to
      ``[0, scores.size]``.
    score_fn: optional elementwise function; if given, the scores are ``score_fn(scores)``,
      recomputed in every pass instead of stored (e.g. ``jnp.abs`` on the weights).

  Returns:
    A bool array of ``scores.shape`` with exactly ``clip(k, 0, size)`` True entries.
  """
  return global_topk_masks([scores], k, score_fn=score_fn)[0]


def global_topk_masks(scores: Sequence[jax.Array | Lazy], k, *,
                      score_fn: Callable[[jax.Array], jax.Array] | None = None
                      ) -> list[jax.Array]:
  """Boolean masks keeping exactly ``k`` largest scores across several arrays.

  One threshold is shared by all arrays (global pruning). Nothing is concatenated and no
  key array is stored, so the extra memory is one boolean mask per array.

  Args:
    scores: a sequence of float arrays (or :class:`Lazy` scores).
    k: total number of entries to keep (int or traced int scalar).
    score_fn: optional elementwise function applied to each array to get its scores,
      recomputed in every pass instead of stored (saves a copy of the scores).

  Returns:
    A list of bool masks, one per input array.
  """
  inputs = [x if isinstance(x, Lazy) else Lazy(lambda a: a, x) for x in scores]
  if score_fn is not None:
    inputs = [Lazy(lambda *a, f=x.fn: score_fn(f(*a)), *x.args) for x in inputs]
  n = sum(x.size for x in inputs)
  if n >= 2**31:
    raise ValueError(f'global_topk_masks counts in int32: the arrays hold {n} elements; at most '
                     f'{2**31 - 1} are supported.')
  k = _clip_count(k, n)
  if n == 0:
    return [jnp.zeros(x.shape, bool) for x in inputs]
  masks = _topk_masks(inputs, jnp.maximum(k, 1), n)
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

"""Compiler workarounds: each named, with what it prevents and where it was measured.

Every function here changes how XLA compiles a computation, never its values (each returns
its input bit-exact, or a sum computed in another order where said). Each was measured on
XLA's CPU backend with jax and jaxlib 0.10.2, and ``tests/core/test_xla_workarounds.py``
holds a "still needed" test per workaround: it compiles a small computation without the
workaround and checks that the problem is there, so an XLA that makes one unnecessary
shows up as a failing test (then measure, and remove the workaround).

Each can be switched off, to measure what it does on another backend or XLA: the
environment variable ``PRUNAX_XLA_WORKAROUNDS_OFF`` holds a comma-separated list of
names from :data:`NAMES`, or ``all``. It is read when a computation is traced, so it
applies to computations traced after it is set (``benchmarks/device.sh`` times every
benchmark with and without them).
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Where the workarounds below were measured (named in the "still needed" tests' messages).
MEASURED_ON = 'cpu/jax 0.10.2'

# The workarounds, by the names ``PRUNAX_XLA_WORKAROUNDS_OFF`` switches off.
NAMES = (
  'loop_variant',
  'opaque_zero',
  'FUSED_CONCAT_OPERANDS',
  'leaf_row',
  'after',
  'shared_flag',
  'fused_sum',
  'blocked_sum',
  'unstack',
  'unfused_concatenate',
  'gathered_sample',
)
OFF_VARIABLE = 'PRUNAX_XLA_WORKAROUNDS_OFF'


def switched_off(name: str) -> bool:
  """Whether workaround ``name`` is switched off by ``PRUNAX_XLA_WORKAROUNDS_OFF``.

  Raises:
    ValueError: the variable names something other than ``all`` or one of :data:`NAMES`.
  """
  off = {n.strip() for n in os.environ.get(OFF_VARIABLE, '').split(',') if n.strip()}
  unknown = sorted(off - set(NAMES) - {'all'})
  if unknown:
    raise ValueError(
      f'{OFF_VARIABLE}={os.environ[OFF_VARIABLE]!r} names {unknown}: valid are "all" or a '
      f'comma-separated list of {", ".join(NAMES)}'
    )
  return 'all' in off or name in off


def loop_variant(x: Any, witness: Any) -> Any:
  """``x`` unchanged, but computed after ``witness`` (loop state), so it is loop variant.

  Prevents: XLA's while-loop invariant code motion storing a full-size value computed
  only from values the loop does not change (the keys of the scores, a hash of
  positions) once before the loop and reading it back in every iteration: for a
  4M-weight leaf a 16 MB temporary and a write and a read more per selection. With the
  arguments of the scores read through ``loop_variant(x, witness)`` (``witness``: a value
  of the loop state), the keys are recomputed, fused, inside each counting pass.
  Measured on CPU, jax 0.10.2: a 256 x 256 magnitude top-k holds 533,448 temporary bytes
  without it (two full-size arrays), 9,352 with it. This ``optimization_barrier``
  replaced an earlier select on a traced zero with the same temporaries (525,448 against
  525,520 bytes for a 4M-weight top-k) and bit-identical masks.

  Args:
    x: an array (or pytree of arrays) the loop reads but does not change.
    witness: a value (or pytree) that changes in every iteration of the loop.

  Returns:
    ``x``, bit-exact.
  """
  if switched_off('loop_variant'):
    return x
  return jax.lax.optimization_barrier((x, witness))[0]


def opaque_zero(witness: Any) -> jax.Array:
  """A uint32 0 that XLA cannot fold, computed after ``witness``.

  Prevents the same hoisting as :func:`loop_variant` for full-size values computed from
  no array at all (a flat position index is an ``iota``): its strides plus this zero
  make the index a function of ``witness``, so inside a selection loop (where
  ``witness`` is read through :func:`loop_variant`) it is recomputed in every pass
  instead of stored once. Measured on CPU, jax 0.10.2: a 256 x 256 top-k of
  :func:`prunax.selection.hash_uniform` scores holds 533,528 temporary bytes without it,
  9,352 with it.

  Args:
    witness: any array (or pytree); inside a loop, a loop-variant one.

  Returns:
    A uint32 scalar 0.
  """
  if switched_off('opaque_zero'):
    return jnp.uint32(0)
  return jax.lax.optimization_barrier((jnp.uint32(0), witness))[0]


# The most operands of a concatenation that XLA's CPU backend fuses into its consumer.
# Prevents: a stored copy of stacked arrays. Selection stacks the arrays of alike leaves
# inside each counting pass so that one vmapped count serves them (one compiled
# computation per group rather than per leaf, see ``selection._pass_counts``); with at
# most this many leaves per stack the concatenation is fused into the count and nothing
# is stored, with more it is materialised in every pass. Measured on CPU, jax 0.10.2: a
# top-k over 16 leaves of 128 x 128 held 82,888 temporary bytes in stacks of 8 leaves,
# 1,082,248 in one stack of 16 (the stack stored).
FUSED_CONCAT_OPERANDS = 8


def fused_concat_operands() -> int | None:
  """:data:`FUSED_CONCAT_OPERANDS`, or None (no limit) where it is switched off."""
  return None if switched_off('FUSED_CONCAT_OPERANDS') else FUSED_CONCAT_OPERANDS


def gathered_sample(sample: jax.Array) -> jax.Array:
  """``sample`` (elements gathered for a search's first pivots) unchanged, but computed
  before anything that reads it.

  Prevents: rounds of XLA's simplification pipeline over the whole step. XLA rewrites a
  gather into its canonical form and views the result through a reshape (a transpose
  under ``vmap``, where the group's axis comes first), which its reshape-mover then moves
  down through the sample's elementwise scores and keys one operation a round; the
  pipeline runs until a round changes nothing, over every instruction of the step.
  Behind an ``optimization_barrier`` the view stays at the gather. Measured on CPU, jax
  0.10.2 (``tests/core/test_simplification_rounds.py``): a global magnitude step of
  four 128 x 128 layers took 8 rounds and a SET step 5 (dense: 2); 3 each with it. The
  12-block transformer of ``benchmarks.transformer``: SET 11 rounds, 340 ms of the
  pipeline, against 5 and 198 ms with it (the dense step: 5 rounds, 75 ms), and the
  same 240 kernels.

  Args:
    sample: the gathered elements (any shape).

  Returns:
    ``sample``, bit-exact.
  """
  if switched_off('gathered_sample'):
    return sample
  return jax.lax.optimization_barrier(sample)


def unfused_concatenate(parts: list[jax.Array]) -> jax.Array:
  """``jnp.concatenate(parts)`` (first axis) followed by filler rows: read only its
  first ``sum(p.shape[0] for p in parts)`` rows, after a computation XLA cannot fold the
  fillers away through (a sort).

  Prevents: one kernel that computes every part. XLA's CPU backend fuses the computations
  of the operands of a concatenation of at most :data:`FUSED_CONCAT_OPERANDS` operands
  into it: the parts, each computed by the same computation on other arrays (the
  samples of groups of alike leaves), become one kernel of all of them, whose LLVM time
  grows with the parts; with more operands it fuses none, and identical parts compile
  one kernel (reused) and a copy. Measured on CPU, jax 0.10.2, with ``python -m
  benchmarks.compile_kernels``: the samples of 64 leaves of 256 x 256 (8 groups of 8) were
  one kernel of 64 gathers, 116-149 ms of LLVM time per selection loop; at 256 leaves (32
  groups) a 49 ms group kernel and a 19 ms copy. The fillers take the operands past the
  limit.

  Args:
    parts: arrays of one dtype and equal shapes but for the first axis.

  Returns:
    The concatenation, with filler rows after the parts' where there are 2 to
    :data:`FUSED_CONCAT_OPERANDS` parts.
  """
  if switched_off('unfused_concatenate') or not 2 <= len(parts) <= FUSED_CONCAT_OPERANDS:
    return jnp.concatenate(parts)
  # One value per filler row: XLA merges adjacent operands that broadcast one value.
  fillers = [
    jnp.full((1, *parts[0].shape[1:]), i, parts[0].dtype)
    for i in range(FUSED_CONCAT_OPERANDS + 1 - len(parts))
  ]
  return jnp.concatenate([*parts, *fillers])


def leaf_row(stacked: jax.Array, i: int) -> jax.Array:
  """``stacked[i]``, read at an index XLA does not fold into the kernels that use it.

  Prevents: one compiled kernel per leaf where one per leaf shape would do. XLA's CPU
  backend compiles a fusion once and reuses the kernel for every fusion with the same
  computation; a constant index into values stacked over leaves (a selection's
  thresholds and pivots, the leaves' RNG keys) is part of the computation, so the kernels
  evaluating the masks or scores of many leaves of one shape would all be distinct.
  Where ``stacked`` was registered by :func:`split_rows`, the row is one output of the
  kernel that splits it (each row its own buffer, an operand of its readers). Otherwise
  it is read by a gather at two equal constant indices, which XLA neither folds into a
  slice nor fuses into its readers: a small gather kernel per leaf reads it, and the large
  kernels are identical. (The index used to go through an ``optimization_barrier``; XLA
  removes barriers before fusion and now folds the index into the readers.) A traced
  ``i`` (alike leaves evaluated together, their indices stacked) is read by a plain
  gather. Measured on CPU, jax 0.10.2: the forward pass of a straight-through magnitude
  step of 64 layers of 256 x 256 compiled 64 distinct kernels (1.13 s of LLVM time)
  reading the layers' thresholds with ``stacked[i]``, 1 and 64 gather kernels (0.48 s)
  with the gather; the whole step compiled 114 kernels with the gather, 51 with the split.

  Args:
    stacked: an array whose first axis runs over leaves.
    i: the leaf's index (an int, or traced).

  Returns:
    ``stacked[i]``, bit-exact.
  """
  if switched_off('leaf_row') or isinstance(i, jax.core.Tracer):
    return stacked[i]
  for array, rows in _SPLIT:
    if array is stacked:
      return rows[i]
  return stacked[jnp.asarray(np.array([i, i], np.int32))][0]


# The arrays split by split_rows and their rows, most recent last. Bounded: an entry is
# only read while its array's trace runs, and old ones are dropped (then read by gathers).
_SPLIT: collections.deque = collections.deque(maxlen=32)


def split_rows(stacked: jax.Array) -> None:
  """Registers every row of a traced ``stacked`` for :func:`leaf_row`: its own buffer,
  all of them outputs of one kernel (a variadic reduce over two copies of each row).

  Call it where ``stacked`` is computed, so the rows belong to the same trace and any
  computation that can read ``stacked`` can read them. Part of the ``leaf_row``
  workaround (switched off with it). Concrete arrays are not registered (eager reads
  compile nothing).

  Args:
    stacked: an integer or float array whose first axis runs over leaves.
  """
  if switched_off('leaf_row') or not isinstance(stacked, jax.core.Tracer):
    return
  rows = _one_kernel_rows(stacked)
  if rows is not None:
    _SPLIT.append((stacked, rows))


def unstack(stacked: jax.Array) -> list[jax.Array]:
  """``list(stacked)``: the rows of ``stacked`` as outputs of one kernel.

  Prevents: one compiled kernel per row position. The rows of a stacked result (the
  packed masks of a group of alike leaves, :func:`prunax.selection.map_alike`) read as
  ``stacked[j]`` are slices, each fused with what computes the rows into a kernel of its
  own that differs from the others by its offset. Here every row is one output of a
  single kernel (a variadic reduce over two copies of each row), the same for every
  group of one shape. Measured on CPU, jax 0.10.2: a SET step of 64 layers of 256 x 256
  compiled 69 distinct kernels (1015 fusions) with slices, 61 (903) with this; the
  unrolled transformer benchmark's SET step 285 and 256, magnitude pruning's 215 and 190.
  Arrays that are neither integers nor floats (bool) are sliced.

  Args:
    stacked: an array whose first axis runs over leaves.

  Returns:
    Its rows, bit-exact.
  """
  if not switched_off('unstack'):
    rows = _one_kernel_rows(stacked)
    if rows is not None:
      return rows
  return [stacked[j] for j in range(stacked.shape[0])]


def _one_kernel_rows(stacked: jax.Array) -> list[jax.Array] | None:
  """The rows of ``stacked`` as the outputs of one variadic reduce (None where it does
  not apply: fewer than 2 rows, or neither integers nor floats)."""
  n, rest, dtype = stacked.shape[0], stacked.shape[1:], stacked.dtype
  if n < 2 or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    return None
  # One broadcast and one split for all rows: a slice and a broadcast per row traced
  # three equations a leaf, for every stacked array of every step.
  twice = jax.lax.broadcast_in_dim(stacked, (n, *rest, 2), tuple(range(1 + len(rest))))
  lowest = jnp.iinfo(dtype).min if jnp.issubdtype(dtype, jnp.integer) else -jnp.inf
  rows = jax.lax.reduce(
    jax.lax.split(twice, [1] * n, axis=0),
    [np.array(lowest, dtype)] * n,
    _max_each,
    (0, len(rest) + 1),
  )
  return list(rows)


def _max_each(a: list, b: list) -> list:
  """The reduction of :func:`_one_kernel_rows` (one function: JAX traces it once)."""
  return [jax.lax.max(x, y) for x, y in zip(a, b, strict=True)]


def after(tree: Any, deps: Any) -> Any:
  """``tree`` with, at every leaf, a float 0 computed from the leaf of ``deps`` there added.

  Prevents: full-size copies of buffers updated in place. When one computation reads the
  old dense weights (the reductions of AutoSparse's threshold gradients) and another
  overwrites them in place (the optimizer's pass over donated buffers), XLA cannot order
  these independent readers and copies the weights instead; reading a 0 from the
  reductions' results makes the optimizer's pass run after them. An
  ``optimization_barrier`` does not replace it (the copies come back). Measured on CPU,
  jax 0.10.2: an AutoSparse + Adam step on two 256 x 256 layers copies both dense weights
  without it, none with it. Each leaf reads the 0 of its own dep only: one 0 summed over
  every dep was fused (a chain of scalar adds) into every leaf's update, so L leaves
  compiled L * L terms (an AutoSparse step of 64 layers compiled in 31 s, 48x the dense
  step; a ``jnp.sum`` of the stacked terms was rewritten into the same chain).

  Args:
    tree: the values that must be computed after ``deps`` (float arrays).
    deps: a tree like ``tree`` of float arrays (finite: ``min(|d|, 0)`` is the 0), None
      where a leaf of ``tree`` depends on nothing.

  Returns:
    ``tree`` with the same values (``g + 0``; a ``-0.0`` becomes ``+0.0``).
  """
  if switched_off('after'):
    return tree

  def add(g, d):
    if g is None or d is None:
      return g
    # Reduced to a scalar: per-layer deps of stacked leaves need not broadcast against g.
    return g + jnp.min(jnp.minimum(jnp.abs(d), 0)).astype(g.dtype)

  return jax.tree.map(add, tree, deps, is_leaf=lambda x: x is None)


def shared_flag(flag: jax.Array) -> jax.Array:
  """``flag`` (a bool scalar), computed once however many computations read it.

  Prevents: compile time quadratic in the number of leaves. XLA fuses a cheap scalar
  computation into every fusion that reads it, so a flag computed from every leaf (all
  gradients finite) and read by every leaf's update compiled L copies of an L-term
  computation; XLA does not duplicate an expensive operation (``exp``) into several
  readers, so the flag behind one is computed once. ``optimization_barrier`` does not
  stop it (it is removed before fusion). Measured on CPU, jax 0.10.2: the optimised
  module of 8, 16, 32 leaves reading an all-finite flag over 8, 16, 32 scalars had 467,
  1,531, 5,579 lines, 216, 376, 696 with this; an AutoSparse + Adam step of 64 layers
  of 256 x 256 compiled in 31 s (48x the dense step) before.

  Args:
    flag: a bool scalar.

  Returns:
    ``flag``, exact (``exp(0) == 1``, ``exp(-1) != 1``).
  """
  if switched_off('shared_flag'):
    return flag
  return jnp.exp(jnp.where(flag, 0.0, -1.0)) == 1.0


def fused_sum(x: jax.Array) -> jax.Array:
  """``sum(x)`` in float32, reduced together with ``any(isnan(x))``.

  Prevents: XLA's CPU backend handing a plain float sum to a library kernel that needs
  its input (here a product of three arrays) stored in full, one array the size of the
  leaf; a two-output reduction stays in XLA's fused loop. With a float and a bool output
  that loop is vectorised; with two float outputs (the sums inside and outside a mask,
  this function until 2026-12) it is scalar, 3-5x slower for rows longer than 8. The
  rows (:func:`_sum_rows`: the last axis, which keeps a split of the leading axes where
  it lies) are reduced first, then their sums. The flag changes no value: where it is
  set the sum is NaN anyway. Measured on CPU, jax 0.10.2, the sum of a product of three
  2048 x 2048 arrays (``benchmarks/workarounds.py``): 0.6-0.9 ms and 10 KB of
  temporaries like this, 1.4-1.6 ms and 16.8 MB (the product) as a plain sum, 3.0-3.5
  ms and 2.1 MB as two float sums in rows of 16; an AutoSparse step of two 256 x 256
  layers holds 820,804 temporary bytes with a plain sum. The sum is in another order
  than ``jnp.sum``'s.

  Args:
    x: the values (any shape; summed in float32).

  Returns:
    The float32 sum of ``x``.
  """
  x = jnp.asarray(x, jnp.float32)
  if switched_off('fused_sum'):
    return jnp.sum(x)
  x = x.reshape(_sum_rows(x.shape))
  sums, nan = _sum_and_any(x, jnp.isnan(x), (x.ndim - 1,))
  # The rows' sums and flags in one more two-output reduction: as two plain ones, XLA's CPU
  # backend splits each into a reduce-window and a reduce, four kernels per sum where this
  # is one (a 64-layer AutoSparse step: 192 fewer kernels to compile).
  total, nan = _sum_and_any(sums, nan, tuple(range(sums.ndim)))
  return jnp.where(nan, jnp.float32(jnp.nan), total)


def _sum_and_any(x: jax.Array, flags: jax.Array, axes: tuple[int, ...]):
  """``(sum(x), any(flags))`` over ``axes``, in one reduction."""
  return jax.lax.reduce((x, flags), (jnp.float32(0), jnp.bool_(False)), _add_or, axes)


def _add_or(a: tuple, b: tuple) -> tuple:
  """The reduction of :func:`_sum_and_any`: one function, so that JAX traces it once (a
  lambda made at each call was traced again at each call)."""
  return a[0] + b[0], a[1] | b[1]


# Rows of fused_sum: a last axis of this many elements or more is summed as it lies.
SUM_ROW = 64


def _sum_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape :func:`fused_sum` reduces the last axis of: ``shape`` when its last axis
  holds ``SUM_ROW`` to 4096 elements, else rows of the largest power of two from 4096 down
  to ``SUM_ROW`` dividing its last axis (when longer) or its size; one row if none does."""
  size = math.prod(shape)
  d = shape[-1] if shape else 1
  if SUM_ROW <= d <= 4096:
    return shape
  lead, n = (shape[:-1], d) if d > 4096 else ((), size)
  for width in (4096, 2048, 1024, 512, 256, 128, SUM_ROW):
    if n % width == 0:
      return (*lead, n // width, width)
  return (size,)


# Rows of a blocked_sum's first reduction: XLA's CPU backend splits longer reductions.
SUM_BLOCK = 32


def blocked_sum(x: jax.Array, dtype: Any, axes: tuple[int, ...] = ()) -> jax.Array:
  """``jnp.sum(x, axis=(*axes, -1), dtype=dtype)`` of integers ``x``, the last axis
  summed in blocks first.

  Prevents: a stored copy of what the sum reads. XLA's CPU backend rewrites a reduction
  of more than 32 elements into a chain of reduce-windows, and an elementwise
  computation feeding a reduce-window is stored in full rather than fused into it.
  Here the last axis is summed in blocks of :data:`SUM_BLOCK` (a reduction XLA keeps,
  with what it reads fused in; padded with zeros), in ``x``'s dtype, and the block sums
  are converted to ``dtype`` and summed: without the conversion between them XLA merges
  the two reductions into one long one again. Measured on CPU, jax 0.10.2: the 5 counts
  packed per row of a selection pass over 64 leaves of 256 x 256 (``selection._field_sums``
  of 64 x 2048 row sums: 5 x 64 x 2048 extracted fields) hold 2,703,360 temporary bytes
  summed plainly, 2,624,000 summed in blocks without the conversion, 84,480 with this.

  ``axes`` (non-negative, other than the last) are summed together with the block sums,
  in the second reduction: of an array split over devices (model parallelism), only the
  result then crosses devices. A last axis shorter than a block, with the axis before it
  among ``axes``, is read in place: each block also takes ``c`` entries of the axis
  before it (split off it, not merged with the last, which may be split over devices),
  the largest ``c`` that divides it with ``c`` times the last axis at most a block.
  Reading it transposed instead (the longest summed axis moved last) cost a top-k of a
  2048 x 512 array, whose row sums have a last axis of 16, 0.80-0.83 ms against
  0.71-0.76 ms. In-place blocks of 4 and 6 once crashed XLA's CPU code generation (an
  i32 compared with an i8 in the LLVM IR of a fusion) in a 3-device straight-through
  step, where the brackets were narrowed by a reduction over booleans; narrowed
  elementwise (``selection._narrow``) they compile
  (``tests/core/test_xla_workarounds.py`` runs that step).

  Args:
    x: an integer array whose block sums fit its dtype.
    dtype: the result's dtype; must differ from ``x``'s (the conversion is what keeps
      the reductions apart).
    axes: further axes to sum.

  Returns:
    The sums along the last axis and ``axes``, exact.
  """
  if switched_off('blocked_sum'):
    return jnp.sum(x, axis=(*axes, x.ndim - 1), dtype=dtype)
  if jnp.dtype(dtype) == x.dtype:
    raise ValueError(
      f"blocked_sum needs a dtype other than the input's ({x.dtype}), got {jnp.dtype(dtype)}"
    )
  width = x.shape[-1]
  if width < SUM_BLOCK and x.ndim - 2 in axes:
    before = x.shape[-2]
    c = max(c for c in range(1, SUM_BLOCK // width + 1) if before % c == 0)
    blocks = x.reshape(*x.shape[:-2], before // c, c, width)
    block_sums = jnp.sum(blocks, axis=(-2, -1), dtype=x.dtype).astype(dtype)
    return jnp.sum(block_sums, axis=axes, dtype=dtype)  # axes holds x.ndim - 2
  if x.shape[-1] % SUM_BLOCK:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % SUM_BLOCK)])
  blocks = x.reshape(*x.shape[:-1], -1, SUM_BLOCK)
  block_sums = jnp.sum(blocks, axis=-1, dtype=x.dtype).astype(dtype)
  return jnp.sum(block_sums, axis=(*axes, x.ndim - 1), dtype=dtype)


def count_true(mask: jax.Array, axes: tuple[int, ...] = ()) -> jax.Array:
  """The int32 number of True entries of ``mask`` along its last axis and ``axes``, by
  :func:`blocked_sum` (a plain int32 sum stored the converted mask, 4 bytes a weight)."""
  return blocked_sum(mask.astype(jnp.uint8), jnp.int32, axes)

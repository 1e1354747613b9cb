"""How masks are stored: 1 bit per weight, packed so that a mask shards like its param.

A stored mask is one uint8 per weight (the param's shape) or bits packed along the last
axis by :func:`pack_mask`; :func:`lazy_mask` reads either as a
:class:`prunax.selection.Lazy` boolean mask, unpacked inside whatever reads it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import selection
from prunax.tree_util import is_unpruned

PyTree = Any

try:  # jax <= 0.10 (the pinned version)
  from jax.experimental.shard_alike import shard_alike
except ImportError:  # jax 0.11 removed it: masks' shardings are left to XLA's propagation
  shard_alike = None


def _row_shifts(shape: tuple[int, ...]) -> jax.Array:
  """Bit of element e (0..31, the last axis of ``shape``) of a row of 32 in the
  little-endian uint32 word of its 4 packed bytes: byte e // 8, most significant bit first
  (numpy's packbits order), ``8 * (e // 8) + 7 - e % 8 == e ^ 7``. An iota, computed
  inside the kernels that pack or read the masks: a constant array would be one more
  operand of each, in an order XLA may give differently to one of several alike kernels,
  which it then compiles apart (the last chunk of alike leaves in a selection pass did)."""
  e = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
  return jax.lax.bitwise_xor(e, np.uint32(7))


# The last axis of a mask is packed in gcd(d, _PACK_BLOCKS) blocks, each to whole bytes, so
# that every split of it into 2, 4 or 8 equal shards falls on byte boundaries: a packed mask
# shards like its param (same PartitionSpec, each device packs its own weights).
_PACK_BLOCKS = 8


def _pack_blocks(d: int) -> tuple[int, int]:
  """``(blocks, weights per block)`` of the packed layout of a last axis of ``d`` weights.

  Blocks of a multiple of 8 weights pack to the same bits as the whole axis, so such axes
  are one block (numpy's ``packbits``).
  """
  blocks = math.gcd(d, _PACK_BLOCKS) if d else 1
  if (d // blocks) % 8 == 0:
    return 1, d
  return blocks, d // blocks


def pack_mask(mask: jax.Array) -> jax.Array:
  """Packs a boolean mask into uint8 bits along its last axis.

  The last axis (``d`` weights) is cut into ``b = gcd(d, 8)`` equal blocks and each block
  is packed by numpy's ``packbits`` (most significant bit first, the block's last byte
  padded with zeros), giving shape ``(..., b * ceil(d / (8 * b)))``. When ``d / b`` is a
  multiple of 8 this is ``packbits`` of the whole axis. The blocks make the packing
  shard-local: a split of the last axis into 2, 4 or 8 shards (or another split that
  :func:`packing_aligned` accepts) is a split of the packed bytes, so the packed mask
  takes its param's sharding and is the same whatever the sharding. When the last axis
  holds a multiple of 32 weights in one block, they are packed 32 at a time into a uint32
  word, which keeps the packing a plain loop over rows of the flat mask.
  """
  mask = mask.astype(bool)
  shape = jnp.shape(mask)
  if not shape:
    return jnp.packbits(mask, axis=-1)
  blocks, width = _pack_blocks(shape[-1])
  if blocks > 1:
    packed = jnp.packbits(mask.reshape(shape[:-1] + (blocks, width)), axis=-1)
    return packed.reshape(shape[:-1] + (blocks * packed.shape[-1],))
  if not _one_block_of_words(shape[-1]):
    return jnp.packbits(mask, axis=-1)
  # Only the last axis is split, so the packed mask keeps the mask's sharding.
  rows = mask.reshape(shape[:-1] + (shape[-1] // 32, 32)).astype(jnp.uint32)
  bits = jax.lax.shift_left(rows, _row_shifts(rows.shape))
  words = jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is an OR
  packed = jax.lax.bitcast_convert_type(words, jnp.uint8)  # (..., d // 32, 4), little-endian
  return packed.reshape(shape[:-1] + (shape[-1] // 8,))


def pack_masks(masks: list) -> list:
  """:func:`pack_mask` of every mask (bool arrays or :class:`prunax.selection.Lazy` masks).

  Alike lazy masks (the same expression on arrays of one shape, e.g. the threshold masks
  of repeated blocks) are evaluated and packed by one vmapped computation
  (:func:`prunax.selection.map_alike`): a step compiles one kernel per group of them, not
  one per mask, and stores only their packed bits.
  """
  return selection.map_alike(pack_mask, masks)


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_mask` for a parameter of ``shape``; returns a bool mask."""
  shape = tuple(shape)
  blocks, width = _pack_blocks(shape[-1])
  if width == 1:
    # One weight per byte (a last axis of 1, 2, 4 or 8): the packed mask has the param's
    # shape, as a uint8 mask does, and either is nonzero exactly where a weight is kept.
    return (packed != 0).reshape(shape)
  lead, n_bytes = shape[:-1], packed.shape[-1] // blocks
  # Bit i of a byte (most significant first, numpy's order) is kept where the byte
  # shifted left by i is at least 128: three lax operations per mask where
  # jnp.unpackbits traces a dozen (every unpacking is repeated in each kernel that reads
  # the mask: the optimizer's, per pruned leaf). The shifts are an iota, computed inside
  # the kernels that read the mask: a constant array of bits would be one more operand of
  # each, in an order that differs between leaves, and XLA would compile alike leaves'
  # kernels apart.
  full = lead + (blocks, n_bytes, 8)
  last = len(full) - 1
  bytes_ = jax.lax.broadcast_in_dim(
    packed.reshape(lead + (blocks, n_bytes)), full, tuple(range(last))
  )
  shifted = jax.lax.shift_left(bytes_, jax.lax.broadcasted_iota(jnp.uint8, full, last))
  keep = jax.lax.ge(shifted, np.uint8(128)).reshape(lead + (blocks, n_bytes * 8))
  if n_bytes * 8 != width:
    keep = keep[..., :width]
  return keep.reshape(shape)


def _packed_bits_at(packed: jax.Array, shape: tuple[int, ...], stride: int) -> jax.Array:
  """Bits of every ``stride``-th weight (flat order) of a mask packed by :func:`pack_mask`."""
  d = shape[-1]
  _, width = _pack_blocks(d)
  # Positions are static: computed here (numpy), so the step reads one gather of bytes
  # rather than tracing the index arithmetic and bounds handling per leaf.
  flat = np.arange(0, math.prod(shape), stride)
  row, col = flat // d, flat % d
  at = col % width  # position in its block; each block starts a byte
  byte_col = (col // width) * -(-width // 8) + at // 8
  # Gathered at the packed array's own axes, never flattened: see selection.strided_elements.
  lead = np.unravel_index(row, shape[:-1]) if len(shape) > 1 else ()
  index = np.stack((*lead, byte_col), axis=1).astype(np.int32)
  byte = selection.static_gather(jnp.asarray(packed), index, unique=stride >= 8)
  return ((byte >> (7 - at % 8).astype(np.uint8)) & 1).astype(bool)


def packing_aligned(d: int, shards: int) -> bool:
  """Whether a last axis of ``d`` weights split into ``shards`` equal parts splits its
  packed mask (:func:`pack_mask`) into equal parts holding the same weights.

  True for 2, 4 and 8 shards of any axis and e.g. 3 shards of 64 weights; false e.g. for
  3 shards of 25 weights, or of 16 weights of an axis of 48 (packed in 8 blocks of 6).
  A packed mask of an unaligned split cannot be sharded like its param; such masks are
  stored unpacked (``packed_masks``).
  """
  if shards <= 1:
    return True
  if d % shards:
    return False
  blocks, width = _pack_blocks(d)
  block_bytes = -(-width // 8)
  n_bytes = blocks * block_bytes
  if n_bytes % shards:
    return False
  for j in range(1, shards):
    start = j * d // shards  # first weight of shard j: it must start byte j * n_bytes / shards
    if (start % width) % 8 or (start // width) * block_bytes + (start % width) // 8 != (
      j * n_bytes // shards
    ):
      return False
  return True


def last_axis_shards(param: Any) -> int:
  """Into how many parts the sharding of a placed array splits its last axis (1 if it
  is not split, not placed, or 0-d)."""
  sharding = getattr(param, 'sharding', None)
  shape = np.shape(param)
  if sharding is None or not shape or not shape[-1]:
    return 1
  try:
    shard = sharding.shard_shape(shape)[-1]
  except (ValueError, TypeError):  # a layout jax cannot describe per shard
    return 1
  return max(1, shape[-1] // max(shard, 1))


def _one_block_of_words(d: int) -> bool:
  """Whether a last axis of ``d`` weights packs as one block of uint32 words."""
  return _pack_blocks(d)[0] == 1 and d % 32 == 0


def _packed_rows(packed: jax.Array) -> jax.Array:
  """A packed mask of one block of a multiple of 32 weights, as bool ``(n // 32, 32)``."""
  words = jax.lax.bitcast_convert_type(packed.reshape(packed.shape[:-1] + (-1, 4)), jnp.uint32)
  full = words.shape + (32,)
  words = jax.lax.broadcast_in_dim(words, full, tuple(range(words.ndim)))
  bits = jax.lax.shift_right_logical(words, _row_shifts(full))
  return jax.lax.ne(jax.lax.bitwise_and(bits, np.uint32(1)), np.uint32(0))


def shard_like_param(stored: jax.Array, param: jax.Array) -> jax.Array:
  """``stored`` (a mask of ``param``: uint8, or packed by :func:`pack_mask`), constrained
  under ``jit`` to be sharded like ``param`` (through a view of the param with one
  weight per packed byte, which has the packed shape). Unconstrained on a jax without
  ``shard_alike`` (0.11 removed it; the pinned 0.10 has it)."""
  if shard_alike is None:
    return stored
  shape = jnp.shape(param)
  if stored.shape != shape:
    blocks, width = _pack_blocks(shape[-1])
    if width % 8 == 0:  # one block of whole bytes: split the axis, not a slice of it
      param = param.reshape(shape[:-1] + (width // 8, 8))[..., 0]
    else:
      param = param.reshape(shape[:-1] + (blocks, width))[..., ::8]
    param = param.reshape(stored.shape)
  return shard_alike(param, stored)[1]


def lazy_masks(masks: PyTree, params: PyTree) -> PyTree:
  """Stored masks as :class:`prunax.selection.Lazy` boolean masks (None stays None).

  Unpacking then happens inside whatever reads them (a selection pass, an elementwise
  update), so no unpacked copy is stored.
  """
  return jax.tree.map(
    lambda m, p: None if is_unpruned(m) else lazy_mask(m, jnp.shape(p)),
    masks,
    params,
    is_leaf=is_unpruned,
  )


def lazy_mask(stored: jax.Array, shape: tuple[int, ...]) -> selection.Lazy:
  """One stored mask (uint8, or packed by :func:`pack_mask`) as a lazy bool mask."""
  shape = tuple(shape)
  if stored.shape == shape:
    return selection.Lazy(lambda x: x.astype(bool), stored)
  d = shape[-1]
  # Shapes are read from the packed array (only its last axis differs), so the same
  # expression reads one layer's slice of a stacked mask (selection.map_layers).
  return selection.Lazy(
    lambda x: unpack_mask(x, x.shape[:-1] + (d,)),
    stored,
    shape=shape,
    sample=lambda stride, x: _packed_bits_at(x, x.shape[:-1] + (d,), stride),
    rows=_packed_rows if _one_block_of_words(d) else None,
  )


def unpack_masks(masks: PyTree, params: PyTree) -> PyTree:
  """Boolean masks from stored masks (uint8 or packed), given params for the shapes."""
  return selection.materialize_all(lazy_masks(masks, params))


def apply_mask(param: jax.Array, mask: jax.Array | None, is_packed: bool = False) -> jax.Array:
  """``param`` with zeros where ``mask`` is 0 (a None mask keeps it; packed: see pack_mask)."""
  if mask is None:
    return param
  keep = unpack_mask(mask, jnp.shape(param)) if is_packed else mask
  return jnp.where(keep, param, 0).astype(jnp.result_type(param))


@functools.lru_cache(maxsize=4096)
def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the mask of a param of ``shape`` packed by :func:`pack_mask`."""
  return tuple(jax.eval_shape(pack_mask, jax.ShapeDtypeStruct(shape, jnp.bool_)).shape)

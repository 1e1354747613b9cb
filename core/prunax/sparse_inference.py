"""Sparse matrix layouts whose products are faster than dense in plain XLA.

Two layouts for the 2-D kernel ``w`` of ``y = x @ w`` (``w`` of shape ``(K, N)``):

* :class:`BlockSparse`: the nonzero ``(bk, bn)`` blocks of ``w``, sorted by output block
  column. A product gathers the input slice of every stored block, runs one batched dot and
  sums the partial products per output block (a sorted segment sum). It reads
  ``density * K * N`` weights plus two int32 per block, and its dots are ``bk x bn``
  matrix products, so it is faster than dense at every batch size once enough blocks are
  zero (see ``benchmarks/sparse_inference.py``).
* :class:`EllSparse`: per output column, the row indices and values of its nonzeros,
  padded to the longest column (ELLPACK). A product is one gather of ``x`` and one
  multiply-reduce; it reads ``2 * density * K * N`` numbers, which beats the dense
  product's ``K * N`` when ``x`` is a single row (memory-bound) and loses once the batch
  makes the dense product compute-bound.

:func:`choose_format` picks one per tensor from its zero pattern; :mod:`prunax.export`
uses it for ``fmt='auto'``. Building a layout is a host-side step (the number of stored
blocks sets the shapes); products work under ``jax.jit``.

A scanned (stacked) kernel, ``L`` layers of ``(K, N)`` along a layer axis, is held as one
layout whose arrays carry that layer axis (:func:`stack_layers`): every layer padded to the
stack's largest block count or column width. ``flax.linen.scan`` (or ``vmap``) slices
every array of a pytree along the axis it scans, so the scan's body receives one layer's
layout, and its product runs sparse inside the scan.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax.layers import slice_shape
from prunax.sparsity_types import nm_default_axis

#: block shapes that ``choose_format`` tries, largest first.
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8))


def nonzero_bits(x: np.ndarray) -> np.ndarray:
  """True where the element's bits are not all zero (so -0.0 and NaN count as stored)."""
  return x.view(np.dtype(f'u{x.dtype.itemsize}')) != 0


def _check_2d(x: np.ndarray, what: str) -> None:
  if x.ndim != 2:
    raise ValueError(f'{what} needs a 2-D array, got shape {x.shape}.')


class _Layers:
  """What the 2-D layouts share for stacked layers (see the module docstring).

  A layout built with a ``layer_axis`` holds every layer when its arrays carry that axis,
  and one layer once a scan has sliced them (its shape is then the layer's)."""

  _LAYER_NDIM: int  # ndim of ``values`` for one layer

  @property
  def stacked(self) -> bool:
    """Whether this holds a stack of layers (its arrays carry the layer axis)."""
    return self.layer_axis is not None and self.values.ndim > self._LAYER_NDIM

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense shape: the stack's, or one layer's once a scan has sliced the arrays."""
    return self._shape if self.stacked else self.layer_shape

  @property
  def layer_shape(self) -> tuple[int, int]:
    """The 2-D dense shape of one layer."""
    return slice_shape(self._shape, self.layer_axis)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    return self.values.dtype

  def todense(self) -> jax.Array:
    """The dense array, bit-exact (works under ``jax.jit``; outside one, a compiled program
    per layout's shapes, not an operation at a time)."""
    return jitted_todense(self)

  def _todense(self) -> jax.Array:
    if not self.stacked:
      return self._layer_todense()
    children, aux = self.tree_flatten()
    one = lambda *c: type(self).tree_unflatten(aux, c)._layer_todense()  # noqa: E731
    return jax.vmap(one, in_axes=self.layer_axis, out_axes=self.layer_axis)(*children)

  def _check_one_layer(self, what: str) -> None:
    if self.stacked:
      raise ValueError(
        f'{what} multiplies one 2-D layout; {self!r} holds {self._shape[self.layer_axis]} '
        f'layers along axis {self.layer_axis}. Multiply a layer at a time (a scan over the '
        'layer axis passes each layer to its body).'
      )

  def _layers_repr(self) -> str:
    if not self.stacked:
      return ''
    return f', layers={self._shape[self.layer_axis]} on axis {self.layer_axis}'


def jitted_todense(layout: Any) -> jax.Array:
  """The dense array of a sparse layout, as one compiled program per type and shapes.

  Op by op, each operation of a densification compiled for every new shape; this is what
  the layouts' ``todense()`` call, and it is inlined under a caller's jit. An
  :class:`EllSparse` whose arrays are on the host (NumPy, or one CPU device) is first
  padded to :func:`shared_width` of its width, so that leaves of one shape whose fullest
  columns differ share a few programs (its padding entries are dropped as before).

  Args:
    layout: a :class:`BlockSparse`, :class:`EllSparse`, :class:`ConvFilter` or
      :class:`prunax.export.NMCompressed` (an object with a ``_todense`` method).

  Returns:
    The dense array, bit-exact.
  """
  return _compiled_todense(_at_shared_width(layout))


@jax.jit
def _compiled_todense(layout: Any) -> jax.Array:
  return layout._todense()


def shared_width(width: int) -> int:
  """``width`` rounded up to one of two steps an octave (1, 2, 3, 4, 6, 8, 12, 16, 24, 32,
  48, ...): at most half more, and few distinct widths to compile for."""
  if width <= 4:
    return width
  step = 1 << ((width - 1).bit_length() - 2)
  return -(-width // step) * step


def _host_array(a: Any) -> np.ndarray | None:
  """``a`` as a NumPy array if it is one or lives on one CPU device (so reading it copies
  nothing across devices), else None (traced, sharded or on an accelerator)."""
  if isinstance(a, np.ndarray):
    return a
  if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array):
    return None
  devices = a.devices()
  if len(devices) != 1 or next(iter(devices)).platform != 'cpu':
    return None
  return np.asarray(a)


def _at_shared_width(layout: Any) -> Any:
  """``layout`` with an :class:`EllSparse` (or the one a :class:`ConvFilter` holds)
  padded on the host to :func:`shared_width` of its width; any other layout as it is."""
  if isinstance(layout, ConvFilter):
    matrix = _at_shared_width(layout.matrix)
    return layout if matrix is layout.matrix else ConvFilter(matrix, layout.shape)
  if not isinstance(layout, EllSparse):
    return layout
  extra = shared_width(layout.width) - layout.width
  values, rows = _host_array(layout.values), _host_array(layout.rows)
  if not extra or values is None or rows is None:
    return layout
  pad = [(0, 0)] * (values.ndim - 1) + [(0, extra)]
  padded = [np.pad(values, pad), np.pad(rows, pad)]  # +0.0 values at row 0, not stored
  if isinstance(layout.values, jax.Array):
    padded = [jax.device_put(x, next(iter(layout.values.devices()))) for x in padded]
  return EllSparse(*padded, layout.counts, layout._shape, layout.layer_axis)


@jax.tree_util.register_pytree_node_class
class BlockSparse(_Layers):
  """The nonzero blocks of a 2-D array, sorted by (block column, block row).

  Attributes:
    values: the stored blocks, shape ``(num_blocks, bk, bn)``.
    block_rows, block_cols: int32 block coordinates of each stored block, ``(num_blocks,)``;
      a block row of ``gk`` (one past the last) marks padding of a stacked layout.
    shape: the dense shape ``(K, N)`` (need not be a multiple of the block: edge blocks
      are zero-padded); of a stack, ``(K, N)`` with the layer axis inserted.
    block_shape: ``(bk, bn)``.
    layer_axis: None, or the layer axis of a stack (:func:`stack_layers`): then every
      array carries it, at that position.
  """

  _LAYER_NDIM = 3

  def __init__(self, values, block_rows, block_cols, shape, block_shape, layer_axis=None):
    self.values, self.block_rows, self.block_cols = values, block_rows, block_cols
    self._shape = tuple(shape)
    self.block_shape = tuple(block_shape)
    self.layer_axis = layer_axis

  def tree_flatten(self):
    aux = (self._shape, self.block_shape, self.layer_axis)
    return (self.values, self.block_rows, self.block_cols), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def grid(self) -> tuple[int, int]:
    """Number of block rows and block columns of a layer (edge blocks included)."""
    return tuple(-(-d // b) for d, b in zip(self.layer_shape, self.block_shape))

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.block_rows.nbytes + self.block_cols.nbytes)

  def _layer_todense(self) -> jax.Array:
    (gk, gn), (bk, bn), (k, n) = self.grid, self.block_shape, self.layer_shape
    grid = (
      jnp.zeros((gk, gn, bk, bn), self.dtype)
      .at[self.block_rows, self.block_cols]
      .set(self.values, mode='drop')  # padding blocks (row gk) are dropped
    )
    dense = grid.transpose(0, 2, 1, 3).reshape(gk * bk, gn * bn)
    return dense[:k, :n]

  def __repr__(self):
    return (
      f'BlockSparse(shape={self.shape}, block_shape={self.block_shape}, '
      f'blocks={self.block_count}/{math.prod(self.grid)}{self._layers_repr()}, '
      f'dtype={self.dtype})'
    )

  @property
  def block_count(self) -> int:
    """Stored blocks of a layer (of a stack: per layer, padding included)."""
    return self.block_rows.shape[1 - self.layer_axis if self.stacked else 0]


@jax.tree_util.register_pytree_node_class
class EllSparse(_Layers):
  """Per output column of a 2-D array, its nonzero rows and values, padded (ELLPACK).

  Attributes:
    values: ``(N, width)``; padding entries are ``+0.0``.
    rows: int32 ``(N, width)`` row index of each value; padding entries point at row 0.
    counts: int32 ``(N,)`` number of stored entries per column (the rest is padding).
    shape: the dense shape ``(K, N)``; of a stack, with the layer axis inserted.
    layer_axis: None, or the layer axis of a stack (:func:`stack_layers`): then every
      array carries it, at that position.
  """

  _LAYER_NDIM = 2

  def __init__(self, values, rows, counts, shape, layer_axis=None):
    self.values, self.rows, self.counts = values, rows, counts
    self._shape = tuple(shape)
    self.layer_axis = layer_axis

  def tree_flatten(self):
    return (self.values, self.rows, self.counts), (self._shape, self.layer_axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def width(self) -> int:
    """Stored entries per column, padding included."""
    return self.values.shape[-1]

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.rows.nbytes + self.counts.nbytes)

  def _layer_todense(self) -> jax.Array:
    k, n = self.layer_shape
    stored = jnp.arange(self.rows.shape[1]) < self.counts[:, None]
    rows = jnp.where(stored, self.rows, k)  # padding lands out of bounds and is dropped
    cols = jnp.broadcast_to(jnp.arange(n)[:, None], rows.shape)
    return jnp.zeros((k, n), self.dtype).at[rows, cols].set(self.values, mode='drop')

  def __repr__(self):
    return (
      f'EllSparse(shape={self.shape}, width={self.width}{self._layers_repr()}, dtype={self.dtype})'
    )


@jax.tree_util.register_pytree_node_class
class ConvFilter:
  """A convolution filter ``(window..., in, out)`` held as its 2-D ``(window * in, out)``
  matrix in a sparse layout (:class:`BlockSparse` or :class:`EllSparse`).

  Rows are ordered as the filter's dimensions (window positions, then input channels), the
  order of :func:`conv_patches`, so a convolution is ``conv_patches(x) @ matrix``
  (:func:`conv_matmul`).

  Attributes:
    matrix: the 2-D layout.
    shape: the filter's dense shape.
  """

  def __init__(self, matrix, shape):
    self.matrix = matrix
    self.shape = tuple(shape)

  def tree_flatten(self):
    return (self.matrix,), (self.shape,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def dtype(self):
    return self.matrix.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return self.matrix.nbytes

  def todense(self) -> jax.Array:
    """The dense filter, bit-exact (works under ``jax.jit``; outside one, a compiled
    program per filter's shapes)."""
    return jitted_todense(self)

  def _todense(self) -> jax.Array:
    return self.matrix._todense().reshape(self.shape)

  def __repr__(self):
    return f'ConvFilter(shape={self.shape}, matrix={self.matrix!r})'


def to_conv_filter(x, fmt: str = 'block', block_shape: tuple[int, int] = (16, 16)) -> ConvFilter:
  """:class:`ConvFilter` of a filter ``x`` of shape ``(window..., in, out)`` (``ndim >= 3``).

  Args:
    x: the filter (concrete).
    fmt: ``'block'`` or ``'ell'``, the layout of its ``(window * in, out)`` matrix.
    block_shape: the block of ``'block'``.
  """
  x = np.asarray(x)
  if x.ndim < 3:
    raise ValueError(f'to_conv_filter needs a (window..., in, out) filter, got shape {x.shape}.')
  matrix = x.reshape(-1, x.shape[-1])
  if fmt == 'block':
    return ConvFilter(to_block(matrix, block_shape), x.shape)
  if fmt == 'ell':
    return ConvFilter(to_ell(matrix), x.shape)
  raise ValueError(f"to_conv_filter: fmt must be 'block' or 'ell', got {fmt!r}.")


def conv_patches(
  x: jax.Array,
  window: tuple[int, ...],
  strides: tuple[int, ...],
  padding: str | tuple[tuple[int, int], ...],
  lhs_dilation: tuple[int, ...] | None = None,
  rhs_dilation: tuple[int, ...] | None = None,
) -> jax.Array:
  """The input patches of a convolution of channels-last ``x`` ``(batch, spatial..., C)``.

  Returns ``(batch, out spatial..., prod(window) * C)``, features ordered (window
  positions, then channels), such that ``lax.conv_general_dilated(x, w, strides, padding,
  lhs_dilation, rhs_dilation, ('N...C', '...IO', 'N...C'))`` equals
  ``patches @ w.reshape(-1, out)``. Pure data movement (pads and strided slices), exact.
  """
  rank = len(window)
  lhs_dilation = tuple(lhs_dilation or (1,) * rank)
  rhs_dilation = tuple(rhs_dilation or (1,) * rank)
  if isinstance(padding, str):  # As lax.conv_general_dilated: from the undilated input.
    if any(d != 1 for d in lhs_dilation):
      raise ValueError(
        f'conv_patches: string padding {padding!r} with lhs_dilation={lhs_dilation} is not '
        f'defined (as in lax.conv_general_dilated); give explicit (low, high) pads.'
      )
    dilated_window = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation)]
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated_window, strides, padding)
  config = [(0, 0, 0)]
  config += [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), config + [(0, 0, 0)])
  sizes = [
    (n - (k - 1) * d - 1) // s + 1
    for n, k, d, s in zip(x.shape[1:-1], window, rhs_dilation, strides)
  ]
  slices = []
  for offset in np.ndindex(*window):
    start = [o * d for o, d in zip(offset, rhs_dilation)]
    limit = [a + (m - 1) * s + 1 for a, m, s in zip(start, sizes, strides)]
    slices.append(
      jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))
    )
  patches = jnp.stack(slices, axis=-2)  # (batch, out spatial..., window, C)
  return patches.reshape(*patches.shape[:-2], -1)


def conv_matmul(
  x: jax.Array,
  w: ConvFilter,
  strides: tuple[int, ...],
  padding: str | tuple[tuple[int, int], ...],
  lhs_dilation: tuple[int, ...] | None = None,
  rhs_dilation: tuple[int, ...] | None = None,
) -> jax.Array:
  """A channels-last convolution with a sparse filter: ``conv_patches(x) @ w.matrix``, in
  the dtype of ``x``."""
  window = w.shape[:-2]
  patches = conv_patches(x, window, strides, padding, lhs_dilation, rhs_dilation)
  if isinstance(w.matrix, BlockSparse):
    return block_matmul(patches, w.matrix)
  return ell_matmul(patches, w.matrix)


def to_block(x, block_shape: tuple[int, int], index_dtype=np.int32) -> BlockSparse:
  """:class:`BlockSparse` of a 2-D ``x``: every ``block_shape`` block with a nonzero bit."""
  x = np.asarray(x)
  _check_2d(x, 'to_block')
  block_shape = tuple(block_shape)
  if len(block_shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in block_shape):
    raise ValueError(f'to_block: block_shape must be two positive ints, got {block_shape!r}.')
  (k, n), (bk, bn) = x.shape, block_shape
  gk, gn = -(-k // bk), -(-n // bn)
  padded = np.zeros((gk * bk, gn * bn), x.dtype)
  padded[:k, :n] = x
  blocks = padded.reshape(gk, bk, gn, bn).transpose(0, 2, 1, 3)  # (gk, gn, bk, bn)
  occupied = nonzero_bits(blocks).any(axis=(2, 3))
  cols, rows = np.nonzero(occupied.T)  # sorted by column, then row
  return BlockSparse(
    jnp.asarray(blocks[rows, cols]),
    jnp.asarray(rows.astype(index_dtype)),
    jnp.asarray(cols.astype(index_dtype)),
    x.shape,
    block_shape,
  )


def to_ell(x, index_dtype=np.int32) -> EllSparse:
  """:class:`EllSparse` of a 2-D ``x``: per column, every element with a nonzero bit."""
  x = np.asarray(x)
  _check_2d(x, 'to_ell')
  stored = nonzero_bits(x).T  # (N, K)
  counts = stored.sum(axis=1)
  width = max(int(counts.max(initial=0)), 1)
  # Stored rows first (ascending), then padding; padding values are +0.0 at row 0.
  order = np.argsort(~stored, axis=1, kind='stable')[:, :width]
  pad = np.arange(width) >= counts[:, None]
  rows = np.where(pad, 0, order)
  values = np.where(pad, np.zeros((), x.dtype), np.take_along_axis(x.T, order, axis=1))
  return EllSparse(
    jnp.asarray(values.astype(x.dtype)),
    jnp.asarray(rows.astype(index_dtype)),
    jnp.asarray(counts.astype(index_dtype)),
    x.shape,
  )


def stack_layers(
  x,
  fmt: str,
  layer_axis: int,
  block_shape: tuple[int, int] = (16, 16),
  index_dtype=np.int32,
) -> BlockSparse | EllSparse:
  """One layout of a stacked kernel's layers, its arrays carrying the layer axis.

  Each layer (a ``(K, N)`` slice along ``layer_axis``) is converted as by :func:`to_block`
  or :func:`to_ell`, then padded to the stack's largest block count (zero blocks at block
  row ``gk``, one past the last, which products and ``todense`` skip) or column width
  (zero values, as ELL pads), and the arrays are stacked at ``layer_axis``. A scan over
  that axis passes each layer's own layout to its body.

  Args:
    x: a concrete 3-D array, ``L`` layers along ``layer_axis``.
    fmt: ``'block'`` or ``'ell'``.
    layer_axis: the layer axis of ``x``: 0 or 1 (the position it takes in every array of
      the layout, whose one-layer index arrays are 1-D), or -3 or -2.
    block_shape: the block of ``'block'``.
    index_dtype: dtype of the stored indices.
  """
  x = np.asarray(x)
  if x.ndim != 3:
    raise ValueError(
      f'stack_layers needs a 3-D stack of (K, N) layers, got shape {x.shape}; a stack of '
      'higher-rank kernels is exported whole.'
    )
  if not isinstance(layer_axis, (int, np.integer)) or not -3 <= layer_axis <= 1:
    raise ValueError(
      f'stack_layers: layer_axis must be 0 or 1 (or -3, -2), got {layer_axis!r} for shape '
      f'{x.shape}; a layout stores the layer axis in arrays that have 2 dimensions for one '
      'layer, so a kernel with its layers last is exported whole (or in another format).'
    )
  axis = int(layer_axis) % 3
  layers = [np.take(x, i, axis=axis) for i in range(x.shape[axis])]
  stack = lambda arrays: jnp.asarray(np.stack(arrays, axis=axis))  # noqa: E731
  if fmt == 'block':
    per = [to_block(w, block_shape, index_dtype) for w in layers]
    count = max(b.values.shape[0] for b in per)
    gk, gn = per[0].grid
    pad = (
      lambda a, fill: np.concatenate(  # noqa: E731
        [np.asarray(a), np.full((count - a.shape[0],) + a.shape[1:], fill, a.dtype)]
      )
    )
    return BlockSparse(
      stack([pad(b.values, 0) for b in per]),
      stack([pad(b.block_rows, gk) for b in per]),
      stack([pad(b.block_cols, gn - 1) for b in per]),  # keeps each layer's columns sorted
      x.shape,
      per[0].block_shape,
      axis,
    )
  if fmt == 'ell':
    per = [to_ell(w, index_dtype) for w in layers]
    width = max(e.width for e in per)
    pad = lambda a: np.pad(np.asarray(a), ((0, 0), (0, width - a.shape[1])))  # noqa: E731
    return EllSparse(
      stack([pad(e.values) for e in per]),
      stack([pad(e.rows) for e in per]),
      stack([np.asarray(e.counts) for e in per]),
      x.shape,
      axis,
    )
  raise ValueError(f"stack_layers: fmt must be 'block' or 'ell', got {fmt!r}.")


def block_matmul(x: jax.Array, w: BlockSparse) -> jax.Array:
  """``x @ w`` over the last axis of ``x``: gather, batched dot, sorted segment sum."""
  w._check_one_layer('block_matmul')
  (k, n), (bk, bn), (gk, gn) = w.shape, w.block_shape, w.grid
  lead = x.shape[:-1]
  flat = x.reshape(-1, k)
  if gk * bk != k:
    flat = jnp.pad(flat, ((0, 0), (0, gk * bk - k)))
  xb = flat.reshape(-1, gk, bk).transpose(1, 0, 2)  # (gk, batch, bk)
  # A stack's padding blocks (block row gk, zero values) read zeros.
  xs = jnp.take(xb, w.block_rows, axis=0, mode='fill', fill_value=0)
  partial = jnp.einsum('sbk,skn->sbn', xs, w.values.astype(x.dtype))
  out = jax.ops.segment_sum(partial, w.block_cols, num_segments=gn, indices_are_sorted=True)
  out = out.transpose(1, 0, 2).reshape(-1, gn * bn)[:, :n]
  return out.reshape(lead + (n,))


def ell_matmul(x: jax.Array, w: EllSparse) -> jax.Array:
  """``x @ w`` over the last axis of ``x``: one gather of ``x`` per stored entry."""
  w._check_one_layer('ell_matmul')
  k, n = w.shape
  flat = x.reshape(-1, k)
  out = jnp.einsum('bnw,nw->bn', flat[:, w.rows], w.values.astype(x.dtype))
  return out.reshape(x.shape[:-1] + (n,))


def is_nm(x: np.ndarray, n: int, m: int, axis: int | None) -> bool:
  """True when every group of ``m`` along ``axis`` (None: the input axis, as
  :class:`prunax.NByM`) holds at most ``n`` nonzero bits."""
  axis = nm_default_axis(x.ndim) if axis is None else axis
  axis %= x.ndim
  if x.shape[axis] % m:
    return False
  moved = np.moveaxis(nonzero_bits(x), axis, -1)
  return bool((moved.reshape(moved.shape[:-1] + (-1, m)).sum(-1) <= n).all())


def choose_format(
  x,
  *,
  block_shapes=BLOCK_CANDIDATES,
  max_block_density: float = 0.25,
  max_ell_density: float = 0.25,
  nm: tuple[int, int, int] | None = (2, 4, -1),
  block_fill: float = 0.8,
) -> tuple[str, dict]:
  """The layout ``export(fmt='auto')`` uses for a 2-D tensor, from its zero pattern.

  * ``('block', {'block_shape': b})`` for the largest ``b`` in ``block_shapes`` whose
    stored blocks are at least ``block_fill`` full (so the zeros come in whole blocks) and
    at most ``max_block_density`` of all blocks;
  * else ``('nm', {'n', 'm', 'axis'})`` when the tensor follows the ``nm`` pattern (saves
    memory; on CPU its product runs on the decompressed kernel);
  * else ``('ell', {})`` when at most ``max_ell_density`` of the elements are stored;
  * else ``('dense', {})``.

  Args:
    x: a concrete 2-D array.
    block_shapes: candidate block shapes, tried in order.
    max_block_density: largest fraction of stored blocks worth a block layout.
    max_ell_density: largest fraction of stored elements worth an ELL layout.
    nm: ``(n, m, axis)`` pattern to detect, or None.
    block_fill: smallest mean fraction of nonzeros inside stored blocks.

  Returns:
    ``(format name, keyword arguments of its constructor)``.
  """
  x = np.asarray(x)
  _check_2d(x, 'choose_format')
  stored = nonzero_bits(x)
  nnz = int(stored.sum())
  for bk, bn in block_shapes:
    if bk > x.shape[0] or bn > x.shape[1]:
      continue
    gk, gn = -(-x.shape[0] // bk), -(-x.shape[1] // bn)
    padded = np.zeros((gk * bk, gn * bn), bool)
    padded[: x.shape[0], : x.shape[1]] = stored
    blocks = int(padded.reshape(gk, bk, gn, bn).any(axis=(1, 3)).sum())
    if blocks <= max_block_density * gk * gn and nnz >= block_fill * blocks * bk * bn:
      return 'block', {'block_shape': (bk, bn)}
  if nm is not None and nnz and is_nm(x, *nm) and nnz > max_ell_density * x.size:
    return 'nm', dict(zip(('n', 'm', 'axis'), nm))
  if nnz <= max_ell_density * x.size:
    return 'ell', {}
  return 'dense', {}

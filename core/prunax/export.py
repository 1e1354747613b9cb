"""Sparse export of pruned params, sparse inference and save/load.

A pruned tree is exported leaf by leaf: float leaves with ``ndim >= 2`` (the ones prunax
prunes by default) become

* ``'bcoo'``: a :class:`jax.experimental.sparse.BCOO` (values + int32 coordinates;
  ``(4 + 4 * ndim) / 4`` times the density of fp32 dense bytes, 0.3 at 90% sparsity in 2-D),
* ``'bcsr'``: a :class:`jax.experimental.sparse.BCSR` (2-D leaves; others fall back to BCOO),
* ``'nm'``: an :class:`NMCompressed` (the ``n`` values of every group of ``m`` along an
  axis and their in-group positions, packed in ``ceil(log2 m)`` bits each: 2:4 of fp32
  takes 0.53125 of the dense bytes),
* ``'block'``: a :class:`~prunax.sparse_inference.BlockSparse` (the nonzero blocks of a
  2-D leaf; for ``prunax.Block`` pruning; its product is faster than dense on CPU),
* ``'ell'``: an :class:`~prunax.sparse_inference.EllSparse` (per column, padded rows and
  values of a 2-D leaf; its product beats dense for single-row inputs at high sparsity),
* ``'auto'``: per leaf, the layout :func:`prunax.sparse_inference.choose_format` picks from
  its zero pattern (block, N:M, ELL, or dense when no layout pays off).

Block and ELL hold a convolution filter ``(window..., in, out)`` as a
:class:`~prunax.sparse_inference.ConvFilter`: its ``(window * in, out)`` matrix in that
layout, run by :func:`sparse_apply` as image patches times the matrix. With
``layer_axes``, they hold a scanned stack of ``(K, N)`` kernels as one layout per stack
whose arrays carry the layer axis (:func:`prunax.sparse_inference.stack_layers`), which
the scan slices, so each layer's product runs sparse inside the scan.

Entries are stored where the weight's bits are not all zero, so ``-0.0`` and NaN survive
and ``densify(export_params(p))`` is bit-identical to ``p``. Other leaves stay dense.
Exporting is a host-side step (it needs concrete arrays: the number of stored entries
sets the shapes).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from prunax import layers
from prunax import sparse_inference
from prunax.sparse_inference import BlockSparse
from prunax.sparse_inference import ConvFilter
from prunax.sparse_inference import EllSparse
from prunax.sparse_inference import nonzero_bits
from prunax.sparsity_types import nm_default_axis
from prunax.tree_util import path_name

PyTree = Any

FORMATS = ('bcoo', 'bcsr', 'nm', 'block', 'ell', 'auto')


@jax.tree_util.register_pytree_node_class
class NMCompressed:
  """N:M compressed tensor: ``n`` values per group of ``m`` along ``axis``, with positions.

  Attributes:
    values: the kept values, shape ``moved_shape[:-1] + (groups, n)`` where ``moved_shape``
      is the dense shape with ``axis`` moved last and ``groups = shape[axis] // m``.
    packed_positions: uint8, the in-group position of every value in ``ceil(log2 m)`` bits,
      packed (``np.packbits`` order).
    shape: the dense shape.
    n, m, axis: the pattern.
  """

  def __init__(self, values, packed_positions, shape, n: int, m: int, axis: int):
    self.values = values
    self.packed_positions = packed_positions
    self.shape = tuple(shape)
    self.n, self.m, self.axis = n, m, axis

  def tree_flatten(self):
    return (self.values, self.packed_positions), (self.shape, self.n, self.m, self.axis)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.packed_positions.nbytes)

  def todense(self) -> jax.Array:
    """The dense tensor (works under ``jax.jit``; outside one, a compiled program per
    shape and pattern, not an operation at a time)."""
    return sparse_inference.jitted_todense(self)

  def _todense(self) -> jax.Array:
    bits = _position_bits(self.m)
    count = math.prod(self.values.shape)
    planes = jnp.unpackbits(self.packed_positions, count=count * bits).reshape(count, bits)
    positions = jnp.sum(planes.astype(jnp.int32) << jnp.arange(bits - 1, -1, -1), axis=1)
    positions = positions.reshape(self.values.shape)
    onehot = positions[..., None] == jnp.arange(self.m)  # (..., groups, n, m)
    dense = _select_bits(onehot, self.values)  # (..., groups, m)
    moved = dense.reshape(dense.shape[:-2] + (-1,))
    return jnp.moveaxis(moved, -1, self.axis)

  def __repr__(self):
    return (
      f'NMCompressed(shape={self.shape}, n={self.n}, m={self.m}, axis={self.axis}, '
      f'dtype={self.values.dtype})'
    )


def _select_bits(onehot, values):
  """Per dense slot, the bits of the one value placed there (a bitwise OR, so -0.0 stays)."""
  itype = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[values.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(values, itype)[..., None]
  merged = jnp.bitwise_or.reduce(jnp.where(onehot, bits, jnp.zeros((), itype)), axis=-2)
  return jax.lax.bitcast_convert_type(merged, values.dtype)


def _position_bits(m: int) -> int:
  return max(1, math.ceil(math.log2(m)))


def to_bcoo(x, index_dtype=jnp.int32) -> sparse.BCOO:
  """BCOO of ``x`` holding every element whose bits are nonzero (exact round trip)."""
  x = np.asarray(x)
  coords = np.stack(np.nonzero(nonzero_bits(x)), axis=1).astype(index_dtype)
  data = x[tuple(coords.T)] if x.ndim else x.reshape(1)
  return sparse.BCOO(
    (jnp.asarray(data), jnp.asarray(coords)),
    shape=x.shape,
    indices_sorted=True,
    unique_indices=True,
  )


def to_bcsr(x, index_dtype=jnp.int32) -> sparse.BCSR:
  """BCSR of a 2-D ``x`` holding every element whose bits are nonzero."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f'to_bcsr needs a 2-D array, got shape {x.shape}; use to_bcoo.')
  rows, cols = np.nonzero(nonzero_bits(x))
  indptr = np.zeros(x.shape[0] + 1, np.int64)
  np.add.at(indptr, rows + 1, 1)
  indptr = np.cumsum(indptr)
  return sparse.BCSR(
    (
      jnp.asarray(x[rows, cols]),
      jnp.asarray(cols.astype(index_dtype)),
      jnp.asarray(indptr.astype(index_dtype)),
    ),
    shape=x.shape,
    indices_sorted=True,
    unique_indices=True,
  )


def to_nm(x, n: int = 2, m: int = 4, axis: int | None = None) -> NMCompressed:
  """N:M compressed form of ``x``: every group of ``m`` along ``axis`` has at most ``n``
  elements with nonzero bits (else ValueError); groups with fewer store +0.0 entries.
  ``axis=None`` is :class:`prunax.NByM`'s default (the input axis, -2 of a kernel)."""
  x = np.asarray(x)
  axis = (nm_default_axis(x.ndim) if axis is None else axis) % x.ndim
  if x.shape[axis] % m:
    raise ValueError(
      f'to_nm: axis {axis} of shape {x.shape} has size {x.shape[axis]}, not a multiple of m={m}.'
    )
  moved = np.moveaxis(x, axis, -1)
  groups = moved.reshape(moved.shape[:-1] + (-1, m))
  stored = nonzero_bits(groups)
  most = int(stored.sum(-1).max(initial=0))
  if most > n:
    raise ValueError(
      f'to_nm({n}, {m}): a group holds {most} nonzero elements; at most {n} '
      f'are allowed. Prune with prunax.NByM({n}, {m}) first.'
    )
  # Stored elements first, then the lowest-position zeros, each group's positions ascending.
  order = np.argsort(~stored, axis=-1, kind='stable')[..., :n]
  positions = np.sort(order, axis=-1)
  values = np.take_along_axis(groups, positions, axis=-1)
  bits = _position_bits(m)
  planes = (positions.reshape(-1, 1) >> np.arange(bits - 1, -1, -1)) & 1
  packed = np.packbits(planes.astype(np.uint8).reshape(-1))
  return NMCompressed(jnp.asarray(values), jnp.asarray(packed), x.shape, n, m, axis)


def _is_exportable(x) -> bool:
  return np.ndim(x) >= 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating)


def export_params(
  params: PyTree,
  fmt: str = 'bcoo',
  *,
  n: int = 2,
  m: int = 4,
  axis: int | None = None,
  block_shape: tuple[int, int] = (16, 16),
  filter_fn=None,
  layer_axes: Any = None,
) -> PyTree:
  """Exports the float leaves with ``ndim >= 2`` of a pruned tree to a sparse format.

  Args:
    params: the pruned params (concrete arrays).
    fmt: ``'bcoo'``, ``'bcsr'`` (2-D leaves; others BCOO), ``'nm'``, ``'block'`` or
      ``'ell'`` (2-D leaves; a leaf with more dimensions, a convolution filter
      ``(window..., in, out)``, becomes a :class:`~prunax.sparse_inference.ConvFilter`
      holding its ``(window * in, out)`` matrix in that layout), or ``'auto'`` (the layout
      :func:`~prunax.sparse_inference.choose_format` picks for the leaf's matrix; a leaf
      with more dimensions becomes a ``ConvFilter`` only for block or ELL, else stays dense).
    n, m, axis: the N:M pattern for ``'nm'`` (and the one ``'auto'`` detects).
    block_shape: the block of ``'block'``.
    filter_fn: optional ``fn(name, leaf) -> bool`` choosing the leaves to export (name:
      '/'-joined key path); default: float leaves with ``ndim >= 2``.
    layer_axes: ``{parameter name or regex: axis}`` of stacked (scanned) parameters, as
      the pruner's ``layer_axes`` (flax boxes are read without it). A 3-D stack of
      ``(K, N)`` layers exported as ``'block'`` or ``'ell'`` (or as what ``'auto'`` picks
      from the layers' matrices stacked row-wise) becomes one layout whose arrays carry
      the layer axis (:func:`~prunax.sparse_inference.stack_layers`; layer axis 0 or 1),
      which :func:`sparse_apply` runs sparse inside the scan; under ``'auto'`` a stack
      for which no block or ELL layout pays off stays dense. Other formats export the
      stack whole (as without ``layer_axes``).

  Returns:
    A tree like ``params`` with sparse leaves.

  Raises:
    ValueError: an unknown ``fmt``; a ``layer_axes`` key that matches no parameter or
      an axis out of range; a stack exported as block or ELL whose layer axis is not 0
      or 1.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}; valid formats are {FORMATS}.')
  stack_axes = layers.resolve(params, layers.freeze(layer_axes))

  def export(path, x):
    name = _name(path)
    if not (filter_fn(name, x) if filter_fn else _is_exportable(x)):
      return x
    layer_axis = stack_axes.get(path_name(path)) if np.ndim(x) == 3 else None
    kind, kwargs = fmt, {}
    if fmt == 'auto':
      if np.ndim(x) < 2:
        return x
      if layer_axis is None:
        matrix = np.reshape(x, (-1, np.shape(x)[-1]))
      else:  # the layers' (K, N) matrices, stacked row-wise
        matrix = np.concatenate(list(np.moveaxis(np.asarray(x), layer_axis, 0)))
      kind, kwargs = sparse_inference.choose_format(matrix, nm=(n, m, axis))
      if np.ndim(x) > 2 and kind not in ('block', 'ell'):
        return x
    if kind == 'dense':
      return x
    if layer_axis is not None and kind in ('block', 'ell'):
      return sparse_inference.stack_layers(
        x, kind, layer_axis, kwargs.get('block_shape', block_shape)
      )
    if np.ndim(x) > 2 and kind in ('block', 'ell'):
      return sparse_inference.to_conv_filter(x, kind, kwargs.get('block_shape', block_shape))
    if kind == 'nm':
      return to_nm(x, **(kwargs or {'n': n, 'm': m, 'axis': axis}))
    if np.ndim(x) == 2 and kind in ('bcsr', 'block', 'ell'):
      if kind == 'block':
        return sparse_inference.to_block(x, kwargs.get('block_shape', block_shape))
      return to_bcsr(x) if kind == 'bcsr' else sparse_inference.to_ell(x)
    return to_bcoo(x)

  return jax.tree_util.tree_map_with_path(export, params)


_LAYOUTS = (NMCompressed, BlockSparse, EllSparse, ConvFilter)


def _is_sparse(x) -> bool:
  return isinstance(x, (sparse.BCOO, sparse.BCSR) + _LAYOUTS)


def todense(x) -> jax.Array:
  """Dense array of one exported leaf, bit-exact (stored ``-0.0`` stays ``-0.0``); a
  sparse leaf is densified by one compiled program per its type and shapes."""
  if isinstance(x, (sparse.BCOO, sparse.BCSR)):
    return _bcoo_todense(x)
  return x.todense() if isinstance(x, _LAYOUTS) else x


@jax.jit
def _bcoo_todense(x) -> jax.Array:
  """The dense array of a BCOO or BCSR leaf, outside a caller's jit compiled once per
  shapes (as :func:`prunax.sparse_inference.jitted_todense` does for the layouts)."""
  if isinstance(x, sparse.BCSR):
    x = x.to_bcoo()
  # BCOO.todense adds into zeros (-0.0 + 0.0 == +0.0); coordinates are unique: set them.
  return jnp.zeros(x.shape, x.dtype).at[tuple(x.indices.T)].set(x.data)


def densify(tree: PyTree) -> PyTree:
  """Dense arrays from an exported tree, bit-exact (works under ``jax.jit``)."""
  return jax.tree.map(todense, tree, is_leaf=_is_sparse)


def nbytes(tree: PyTree) -> int:
  """Bytes held by a (dense or exported) tree: values, indices and index pointers."""
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=_is_sparse):
    if isinstance(leaf, _LAYOUTS):
      total += leaf.nbytes
    elif _is_sparse(leaf):
      total += sum(int(a.nbytes) for a in jax.tree.leaves(leaf))
    else:
      total += int(np.asarray(leaf).nbytes)
  return total


def sparse_matmul(x: jax.Array, kernel) -> jax.Array:
  """``x @ kernel`` over the last axis of ``x`` for a dense or exported 2-D ``kernel``,
  computed in the dtype of ``x`` (the kernel's values are cast to it).

  Block and ELL kernels use their own products (:mod:`prunax.sparse_inference`); N:M
  kernels are decompressed first (on CPU no N:M product we measured beats that);
  BCOO/BCSR use ``jax.experimental.sparse``.
  """
  if not _is_sparse(kernel):
    return x @ kernel.astype(x.dtype)
  if isinstance(kernel, BlockSparse):
    return sparse_inference.block_matmul(x, kernel)
  if isinstance(kernel, EllSparse):
    return sparse_inference.ell_matmul(x, kernel)
  if isinstance(kernel, NMCompressed):
    return x @ kernel.todense().astype(x.dtype)
  if isinstance(kernel, sparse.BCSR):  # jax's BCSR products need the sparse operand on the left
    kernel = kernel.to_bcoo()
  if kernel.dtype != x.dtype:
    kernel = sparse.BCOO(
      (kernel.data.astype(x.dtype), kernel.indices),
      shape=kernel.shape,
      indices_sorted=kernel.indices_sorted,
      unique_indices=kernel.unique_indices,
    )
  flat = x.reshape(-1, x.shape[-1])
  out = sparse.sparsify(lambda a, k: a @ k)(flat, kernel)
  return out.reshape(x.shape[:-1] + (kernel.shape[-1],))


def sparse_apply(module, exported: PyTree, *args, **kwargs):
  """``module.apply(params, *args, **kwargs)`` of a Flax linen module on exported params.

  The matrix products of ``nn.Dense`` layers whose kernel is a 2-D BCOO/BCSR, block or
  ELL leaf run as sparse products (:func:`sparse_matmul`), and ``nn.Conv`` layers whose
  kernel is a :class:`~prunax.sparse_inference.ConvFilter` as patches times its sparse
  matrix (:func:`~prunax.sparse_inference.conv_matmul`). A scanned stack exported with
  ``layer_axes`` as block or ELL stays sparse when a scan (or ``nn.vmap``) hands its
  ``nn.Dense`` layers one layer of it: the scan slices the layout's arrays, and each
  layer's product runs sparse. The layer axis declared at export must be the axis the
  scan slices. Every other sparse leaf (BCOO conv kernels, N:M, an ``nn.Embed`` table, a
  stack exported whole, any leaf another layer reads) is densified first, inside the same
  computation.

  Raises:
    ValueError: for an ``nn.Conv`` with a ``ConvFilter`` kernel and an option the sparse
      convolution does not implement (feature groups, a mask, circular/reflect/causal
      padding), naming the layer and the option.
  """
  import flax.linen as nn
  from flax.core import meta  # boxed params (nn.Partitioned): the layers read the values

  # The kernels that layers read whole, by kind: only those stay sparse. (Kept sparse by
  # shape alone, a 2-D embedding table or a stacked norm scale reached its layer as a
  # sparse object, and the apply failed.)
  read: dict = {nn.Conv: set(), nn.Dense: set()}
  sliced: dict = {}  # name -> shape of the slice a Dense reads of a stacked kernel
  # By name (path_name: a flax box's own '.value' is no part of it).
  shapes = {
    path_name(path): np.shape(x)
    for path, x in jax.tree_util.tree_leaves_with_path(densify(exported))
  }

  def record(next_fun, call_args, call_kwargs, context):
    kind = type(context.module)
    if context.method_name == '__call__' and kind in read:
      path = '/'.join(('params', *context.module.path, 'kernel'))
      kernel = meta.unbox(context.module.get_variable('params', 'kernel'))
      if np.shape(kernel) == shapes.get(path):  # not a slice (a layer of a scanned stack)
        read[kind].add(path)
      elif kind is nn.Dense:
        sliced.setdefault(path, set()).add(np.shape(kernel))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: module.apply(p, *args, **kwargs), densify(exported))

  whole_stacks = []  # kernels a scan hands its Dense layers a layer at a time, exported whole

  def keep_sparse(path, x):
    path = path_name(path)
    if _is_stack(x):
      # Every Dense reading it reads one layer (a scan or vmap slices the layout with it).
      return path not in read[nn.Dense] and sliced.get(path) == {_matrix_shape(x)}
    if path in sliced and _is_sparse(x):
      whole_stacks.append(path)
    if isinstance(x, ConvFilter):
      return path in read[nn.Conv]
    return _matrix_shape(x) is not None and path in read[nn.Dense]

  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x if keep_sparse(path, x) else todense(x), exported, is_leaf=_is_sparse
  )
  if whole_stacks:
    warnings.warn(
      f'sparse_apply: {whole_stacks} are read a layer at a time (a scan or vmap) but were '
      'exported whole, so they are densified and run dense. Export them with their layer '
      "axes (export_params(..., 'block' or 'ell', layer_axes={name: axis})) to run each "
      "layer's product sparse.",
      stacklevel=2,
    )

  def sparse_layer(next_fun, call_args, call_kwargs, context):
    layer = context.module
    if context.method_name == '__call__' and isinstance(layer, (nn.Dense, nn.Conv)):
      kernel = meta.unbox(layer.get_variable('params', 'kernel'))
      if isinstance(layer, nn.Dense) and _is_sparse(kernel):
        (inputs,) = call_args
        bias = meta.unbox(layer.get_variable('params', 'bias')) if layer.use_bias else None
        return _sparse_dense(layer.dtype, inputs, kernel, bias)
      if isinstance(layer, nn.Conv) and isinstance(kernel, ConvFilter):
        (inputs,) = call_args
        bias = meta.unbox(layer.get_variable('params', 'bias')) if layer.use_bias else None
        return _sparse_conv(layer, f'nn.Conv at {"/".join(layer.path)}', inputs, kernel, bias)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(sparse_layer):
    return module.apply(params, *args, **kwargs)


def _sparse_conv(layer, where: str, inputs: jax.Array, kernel: ConvFilter, bias) -> jax.Array:
  """``Conv.__call__`` (linen or nnx: the same options) with a sparse filter (the options
  it implements); ``where`` names the layer in errors."""
  from flax.linen import linear

  rank = len(kernel.shape) - 2
  padding = linear.canonicalize_padding(layer.padding, rank)
  problems = []
  if layer.feature_group_count != 1:
    problems.append(f'feature_group_count={layer.feature_group_count}')
  if layer.mask is not None:
    problems.append('mask')
  if isinstance(padding, str) and padding not in ('SAME', 'VALID'):
    problems.append(f'padding={layer.padding!r}')
  if problems:
    raise ValueError(
      f'sparse_apply: {where} has a ConvFilter kernel and '
      f'{", ".join(problems)}; the sparse convolution needs feature_group_count=1, no mask '
      f'and SAME, VALID or explicit padding. Export that kernel in another format '
      f'(export_params(..., filter_fn=...)).'
    )

  def per_dim(value):
    if value is None:
      return (1,) * rank
    return (value,) * rank if isinstance(value, int) else tuple(value)

  batch_shape = inputs.shape[: inputs.ndim - rank - 1]
  flat = inputs.reshape((-1,) + inputs.shape[len(batch_shape) :])
  dtype = _compute_dtype(layer.dtype, inputs, kernel, bias)
  y = sparse_inference.conv_matmul(
    flat.astype(dtype),
    kernel,
    per_dim(layer.strides),
    padding,
    per_dim(layer.input_dilation),
    per_dim(layer.kernel_dilation),
  )
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.reshape(batch_shape + y.shape[1:])


def _is_stack(x) -> bool:
  return isinstance(x, (BlockSparse, EllSparse)) and x.stacked


def _matrix_shape(x) -> tuple[int, ...] | None:
  """The ``(K, N)`` kernel a Dense layer multiplies by with exported leaf ``x`` (of a
  stack: each layer's), or None when ``x`` is no sparse matrix its product runs."""
  if _is_stack(x):
    return x.layer_shape
  if isinstance(x, (sparse.BCOO, sparse.BCSR, BlockSparse, EllSparse)) and x.ndim == 2:
    return tuple(x.shape)
  return None


def _compute_dtype(dtype, inputs, kernel, bias):
  """The dtype a flax Dense/Conv computes in (``promote_dtype``): its ``dtype``, else the
  promoted dtype of its operands (a mixed-precision layer, bf16 over float32 params, must
  keep returning bf16: a scan's carry fails on any other dtype)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(inputs, kernel.dtype, *([] if bias is None else [bias]))


def _sparse_dense(dtype, inputs, kernel, bias) -> jax.Array:
  """``Dense.__call__`` (linen or nnx) with an exported kernel, in the layer's dtype."""
  dtype = _compute_dtype(dtype, inputs, kernel, bias)
  y = sparse_matmul(inputs.astype(dtype), kernel)
  return y if bias is None else y + bias.astype(dtype)


def nnx_sparse(graphdef, *states):
  """The nnx module of exported state (``nnx.merge(graphdef, *states)``) running sparse.

  ``nnx.Linear`` layers whose kernel is a 2-D BCOO/BCSR, block or ELL leaf of their
  ``(in_features, out_features)``, or a stacked block/ELL layout of such layers
  (:func:`export_params` with ``layer_axes``, sliced by ``nnx.scan``/``nnx.vmap`` like any
  state), run :func:`sparse_matmul`; ``nnx.Conv`` layers whose kernel is a
  :class:`~prunax.sparse_inference.ConvFilter` run the sparse convolution, as in
  :func:`sparse_apply`. Every other sparse leaf (an ``nnx.Embed`` table, attention's
  ``LinearGeneral`` kernels, N:M) is densified here, once. The layers are switched to
  subclasses of their own class that override ``__call__`` only, so ``nnx.split`` of the
  result and ``nnx.merge`` under ``jax.jit`` keep running sparse.

  Args:
    graphdef: the module's graph definition (``nnx.split(model)[0]``).
    *states: the exported state(s) (:func:`export_params` of ``nnx.state``), as for
      ``nnx.merge``.

  Returns:
    The module.

  Raises:
    ValueError: as :func:`sparse_apply`, for an ``nnx.Conv`` option the sparse
      convolution does not implement.
  """
  from flax import nnx

  linear, conv = _nnx_sparse_layers()
  model = nnx.merge(graphdef, *states)
  kept = set()
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear) and not isinstance(node, linear):
      if _matrix_shape(node.kernel.get_value()) == (node.in_features, node.out_features):
        node.__class__ = linear
        kept.add(id(node.kernel))
    elif isinstance(node, nnx.Conv) and isinstance(node.kernel.get_value(), ConvFilter):
      node.__class__ = conv
      kept.add(id(node.kernel))
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and id(node) not in kept:
      value = node.get_value()
      if any(_is_sparse(x) for x in jax.tree.leaves(value, is_leaf=_is_sparse)):
        node.set_value(densify(value))
  return model


@functools.cache
def _nnx_sparse_layers():
  """``(linear, conv)``: the nnx layers' subclasses whose ``__call__`` runs sparse."""
  from flax import nnx

  class SparseLinear(nnx.Linear):
    """An ``nnx.Linear`` whose kernel is an exported sparse matrix (:func:`nnx_sparse`)."""

    def __call__(self, inputs):
      bias = None if self.bias is None else self.bias.get_value()
      return _sparse_dense(self.dtype, inputs, self.kernel.get_value(), bias)

  class SparseConv(nnx.Conv):
    """An ``nnx.Conv`` whose kernel is a ``ConvFilter`` (:func:`nnx_sparse`)."""

    def __call__(self, inputs):
      bias = None if self.bias is None else self.bias.get_value()
      return _sparse_conv(self, 'nnx.Conv', inputs, self.kernel.get_value(), bias)

  return SparseLinear, SparseConv


# ------------------------------------------------------------------------------ save/load


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def save(path: str | os.PathLike, exported: PyTree) -> None:
  """Saves an exported (or dense) tree of arrays to one ``.npz`` file.

  The tree is stored by leaf names ('/'-joined key paths); :func:`load` returns nested
  dicts with those keys.
  """
  arrays, manifest = {}, {}
  flat = jax.tree_util.tree_flatten_with_path(exported, is_leaf=_is_sparse)[0]
  for i, (key_path, leaf) in enumerate(flat):
    name = _name(key_path)
    if isinstance(leaf, NMCompressed):
      manifest[name] = {
        'kind': 'nm',
        'shape': leaf.shape,
        'n': leaf.n,
        'm': leaf.m,
        'axis': leaf.axis,
      }
      parts = {'values': leaf.values, 'positions': leaf.packed_positions}
    elif isinstance(leaf, ConvFilter):
      matrix = leaf.matrix
      if isinstance(matrix, BlockSparse):
        manifest[name] = {'kind': 'conv_block', 'block_shape': matrix.block_shape}
        parts = {'values': matrix.values, 'rows': matrix.block_rows, 'cols': matrix.block_cols}
      else:
        manifest[name] = {'kind': 'conv_ell'}
        parts = {'values': matrix.values, 'rows': matrix.rows, 'counts': matrix.counts}
      manifest[name].update(shape=leaf.shape, matrix_shape=matrix.shape)
    elif isinstance(leaf, BlockSparse):
      manifest[name] = {'kind': 'block', 'shape': leaf.shape, 'block_shape': leaf.block_shape}
      manifest[name]['layer_axis'] = leaf.layer_axis
      parts = {'values': leaf.values, 'rows': leaf.block_rows, 'cols': leaf.block_cols}
    elif isinstance(leaf, EllSparse):
      manifest[name] = {'kind': 'ell', 'shape': leaf.shape, 'layer_axis': leaf.layer_axis}
      parts = {'values': leaf.values, 'rows': leaf.rows, 'counts': leaf.counts}
    elif isinstance(leaf, sparse.BCOO):
      manifest[name] = {'kind': 'bcoo', 'shape': leaf.shape}
      parts = {'data': leaf.data, 'indices': leaf.indices}
    elif isinstance(leaf, sparse.BCSR):
      manifest[name] = {'kind': 'bcsr', 'shape': leaf.shape}
      parts = {'data': leaf.data, 'indices': leaf.indices, 'indptr': leaf.indptr}
    else:
      manifest[name] = {'kind': 'dense'}
      parts = {'value': leaf}
    for part, value in parts.items():
      arrays[f'{i}.{part}'] = np.asarray(value)
    manifest[name]['index'] = i
  arrays['__manifest__'] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load(path: str | os.PathLike) -> dict:
  """Loads a tree written by :func:`save` as nested dicts of (sparse) arrays."""
  with np.load(path) as z:
    manifest = json.loads(z['__manifest__'].tobytes().decode())
    tree: dict = {}
    for name, info in manifest.items():
      get = lambda part, i=info['index']: jnp.asarray(z[f'{i}.{part}'])
      kind = info['kind']
      if kind == 'nm':
        leaf = NMCompressed(
          get('values'), get('positions'), info['shape'], info['n'], info['m'], info['axis']
        )
      elif kind == 'block':
        leaf = BlockSparse(
          get('values'),
          get('rows'),
          get('cols'),
          info['shape'],
          info['block_shape'],
          info.get('layer_axis'),
        )
      elif kind == 'ell':
        leaf = EllSparse(
          get('values'), get('rows'), get('counts'), info['shape'], info.get('layer_axis')
        )
      elif kind == 'conv_block':
        matrix = BlockSparse(
          get('values'), get('rows'), get('cols'), info['matrix_shape'], info['block_shape']
        )
        leaf = ConvFilter(matrix, info['shape'])
      elif kind == 'conv_ell':
        matrix = EllSparse(get('values'), get('rows'), get('counts'), info['matrix_shape'])
        leaf = ConvFilter(matrix, info['shape'])
      elif kind == 'bcoo':
        leaf = sparse.BCOO(
          (get('data'), get('indices')),
          shape=tuple(info['shape']),
          indices_sorted=True,
          unique_indices=True,
        )
      elif kind == 'bcsr':
        leaf = sparse.BCSR(
          (get('data'), get('indices'), get('indptr')),
          shape=tuple(info['shape']),
          indices_sorted=True,
          unique_indices=True,
        )
      else:
        leaf = get('value')
      node = tree
      *parents, last = name.split('/')
      for p in parents:
        node = node.setdefault(p, {})
      node[last] = leaf
  return tree

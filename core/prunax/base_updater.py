"""The pruning engine: a self-sufficient Optax wrapper and the base class of algorithms.

``tx = updater.wrap_optax(inner)`` returns a transformation whose updates, applied with
``optax.apply_updates``, leave the params exactly as sparse as the algorithm says, with no
other call. For a step with gradients ``g`` at params ``p`` (the params the model saw):

1. The inner optimizer runs on the masked gradients ``g * m`` (dense gradients for STE),
   giving ``u``. For masked training its per-weight state (moments) of inactive weights is
   held at the inner optimizer's initial value: it is reset under ``m`` as the optimizer
   reads it, so a weight that becomes active again starts with fresh moments. STE-style
   algorithms train every dense weight, so their moments are never reset.
2. On a mask-update step of the schedule, new masks ``m'`` are computed from the weights
   the model saw, ``p`` (zero outside ``m`` after any wrapped step; a weight that is not
   is removed by step 3 anyway), and the raw gradients ``g``. This runs inside a ``lax.cond``
   that reads only the step's inputs, so steps without an update stay one fused
   elementwise pass over the params (the optimizer's own), plus a read of the masks.
3. The returned updates are ``where(m' & m, u, -p)``, so ``p + update`` is ``p + u`` where a
   weight stays and exactly 0 elsewhere (new connections of SET/RigL start at zero).
   STE-style algorithms run the optimizer on dense weights ``d`` kept in the state,
   recompute ``m'`` from ``d + u`` at every step, return ``where(m', d + u, 0) - p`` and
   store ``d + u``.

Scores are :class:`prunax.selection.Lazy` where they are elementwise functions of
buffers (``|w|``, ``|w * g|``, hashed random scores), so the selection recomputes them in
each pass and a mask update adds no full-size score array to memory.

All state (masks, step counter, RNG key, dense weights) lives in :class:`SparseState`, so
hosts checkpoint, replicate and shard it like any optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from prunax import _checks
from prunax import _xla_workarounds
from prunax import layers
from prunax import selection
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.compat import updater_args

PyTree = Any


class SparseState(NamedTuple):
  """Optimizer state of a wrapped transformation.

  It holds arrays only: a leaf that is not pruned, and a field an algorithm does not use,
  is an ``optax.MaskedNode()`` (an empty node, as in ``optax.masked`` states), never
  ``None``, so every checkpointer (orbax, t5x, flax serialization) saves and restores it.

  Attributes:
    inner_state: state of the wrapped optax transformation.
    masks: tree like params; 1-bit keep-masks packed along the last axis (by
      :func:`pack_mask`, in byte blocks that shard like the param) or one uint8 per weight
      with ``packed_masks=False``; ``MaskedNode()`` for leaves that are not pruned.
    count: int32 number of updates done.
    rng: uint32 PRNG key data of shape (2,) (the key is folded with ``count`` when used).
    dense_params: the dense weights of STE-style algorithms (``MaskedNode()`` at leaves
      that are not pruned), else ``MaskedNode()``.
    thresholds: per-leaf learnable thresholds (AutoSparse), else ``MaskedNode()``.
    aux: per-step statistics an algorithm keeps (SNFS: momentum of the gradients), else
      ``MaskedNode()``; see :meth:`BaseUpdater.update_aux`.
    threshold_state: state of the wrapped transformation for the thresholds (AutoSparse
      trains them with the weights' optimizer), else ``MaskedNode()``.
  """

  inner_state: Any
  masks: Any
  count: jax.Array
  rng: jax.Array
  dense_params: Any = None
  thresholds: Any = None
  aux: Any = None
  threshold_state: Any = None


def _is_none(x) -> bool:
  return x is None


def is_unpruned(x) -> bool:
  """Whether a leaf of a masks tree marks a leaf that is not pruned (None or MaskedNode)."""
  return x is None or isinstance(x, optax.MaskedNode)


def _to_stored(tree: PyTree) -> PyTree:
  """``tree`` with its None leaves (or itself, if None) as ``optax.MaskedNode()``."""
  if tree is None:
    return optax.MaskedNode()
  return jax.tree.map(lambda x: optax.MaskedNode() if x is None else x, tree, is_leaf=_is_none)


def _from_stored(tree: PyTree) -> PyTree:
  """Inverse of :func:`_to_stored`: ``MaskedNode`` leaves (or the whole field) as None."""
  if isinstance(tree, optax.MaskedNode):
    return None
  return jax.tree.map(lambda x: None if is_unpruned(x) else x, tree, is_leaf=is_unpruned)


def _unstored(state: SparseState) -> SparseState:
  """The state with None for what is not there (the form the algorithms read)."""
  return state._replace(
    masks=_from_stored(state.masks),
    dense_params=_from_stored(state.dense_params),
    thresholds=_from_stored(state.thresholds),
    aux=_from_stored(state.aux),
    # An optax state is kept as it is (its MaskedNode entries belong to it).
    threshold_state=None
    if isinstance(state.threshold_state, optax.MaskedNode)
    else state.threshold_state,
  )


def _stored(state: SparseState) -> SparseState:
  return state._replace(
    masks=_to_stored(state.masks),
    dense_params=_to_stored(state.dense_params),
    thresholds=_to_stored(state.thresholds),
    aux=_to_stored(state.aux),
    threshold_state=optax.MaskedNode() if state.threshold_state is None else state.threshold_state,
  )


def map_masked(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
  """``fn(mask, *leaves)`` on pruned leaves; elsewhere the leaf of ``trees[0]`` passes through.

  Args:
    fn: function of a mask leaf and the matching leaves of ``trees``.
    masks: tree whose leaves are masks or None.
    *trees: trees with the structure of params.

  Returns:
    A tree like ``trees[0]``.
  """

  def apply(m, *xs):
    if m is None:
      return xs[0] if xs else None
    return fn(m, *xs)

  return jax.tree.map(apply, masks, *trees, is_leaf=_is_none)


def _is_erk(dist) -> bool:
  fn = getattr(dist, 'fn', dist)
  return fn is sparsity_distributions.erk


def _pruned_only(masks: PyTree, tree: PyTree) -> PyTree:
  """``tree`` with None at the leaves that are not pruned."""
  return jax.tree.map(lambda m, x: None if m is None else x, masks, tree, is_leaf=_is_none)


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


# Bit of element e (0..31) of a row of 32 in the little-endian uint32 word of its 4 packed
# bytes: byte e // 8, most significant bit first (numpy's packbits order).
_ROW_SHIFTS = np.array([8 * (e // 8) + 7 - e % 8 for e in range(32)], np.uint32)

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
  bits = mask.reshape(shape[:-1] + (shape[-1] // 32, 32)).astype(jnp.uint32) << _ROW_SHIFTS
  words = jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is an OR
  packed = jax.lax.bitcast_convert_type(words, jnp.uint8)  # (..., d // 32, 4), little-endian
  return packed.reshape(shape[:-1] + (shape[-1] // 8,))


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_mask` for a parameter of ``shape``; returns a bool mask."""
  shape = tuple(shape)
  blocks, width = _pack_blocks(shape[-1])
  if width == 1:
    # One weight per byte (a last axis of 1, 2, 4 or 8): the packed mask has the param's
    # shape, as a uint8 mask does, and either is nonzero exactly where a weight is kept.
    return (packed != 0).reshape(shape)
  packed = packed.reshape(shape[:-1] + (blocks, -1))
  return jnp.unpackbits(packed, axis=-1, count=width).astype(bool).reshape(shape)


def _packed_bits_at(packed: jax.Array, shape: tuple[int, ...], stride: int) -> jax.Array:
  """Bits of every ``stride``-th weight (flat order) of a mask packed by :func:`pack_mask`."""
  d = shape[-1]
  _, width = _pack_blocks(d)
  flat = jnp.arange(0, math.prod(shape), stride)
  row, col = flat // d, flat % d
  at = col % width  # position in its block; each block starts a byte
  byte = packed.reshape(-1, packed.shape[-1])[row, (col // width) * -(-width // 8) + at // 8]
  return ((byte >> (7 - at % 8).astype(jnp.uint8)) & 1).astype(bool)


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
  words = jax.lax.bitcast_convert_type(packed.reshape(-1, 4), jnp.uint32)
  return ((words[:, None] >> _ROW_SHIFTS) & 1).astype(bool)


def _shard_like_param(stored: jax.Array, param: jax.Array) -> jax.Array:
  """``stored`` (a mask of ``param``: uint8, or packed by :func:`pack_mask`), constrained
  under ``jit`` to be sharded like ``param`` (through a view of the param with one
  weight per packed byte, which has the packed shape)."""
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
  return jax.tree.map(
    lambda m: None if m is None else selection.materialize(m),
    lazy_masks(masks, params),
    is_leaf=_is_none,
  )


def apply_mask(param: jax.Array, mask: jax.Array | None, is_packed: bool = False) -> jax.Array:
  """``param`` with zeros where ``mask`` is 0 (a None mask keeps it; packed: see pack_mask)."""
  if mask is None:
    return param
  keep = unpack_mask(mask, jnp.shape(param)) if is_packed else mask
  return jnp.where(keep, param, 0).astype(jnp.result_type(param))


def bool_masks(opt_state: PyTree, params: PyTree) -> PyTree:
  """Boolean keep-masks of the :class:`SparseState` in ``opt_state`` (None: dense leaf)."""
  return unpack_masks(get_sparse_state(opt_state).masks, params)


@dataclasses.dataclass(frozen=True)
class BaseUpdater(updater_args.JaxprunerArgs):
  """Base class of pruning and sparse-training algorithms.

  An algorithm overrides :meth:`calculate_scores` (and, for drop-and-grow methods,
  :meth:`compute_masks`). Instances are immutable and hashable, so they can be static
  arguments of ``jax.jit``.

  jaxpruner's keyword arguments are accepted too (see
  :class:`prunax.compat.updater_args.JaxprunerArgs`).

  Attributes:
    sparsity: target sparsity in [0, 1) (distributed over leaves by
      ``sparsity_distribution_fn``). Not needed when the distribution is a mapping;
      with N:M structure it is ``1 - n/m`` (the default, and the only valid value).
    sparsity_distribution_fn: ``'uniform'``, ``'erk'``, a mapping from parameter name
      (or regex) to sparsity, or any callable ``fn(params, sparsity) -> tree``; without
      ``sparsity``, a callable is called as ``fn(params)`` (jaxpruner's form), and
      ``functools.partial(uniform, sparsity=s)`` means ``sparsity=s``.
    sparsity_type: a :mod:`prunax.sparsity_types` structure or its string form.
    scheduler: a :mod:`prunax.sparsity_schedules` schedule.
    seed: seed of the RNG key kept in the state (random scores, random initial masks).
    packed_masks: store masks as 1 bit per weight, packed along the last axis (the
      default: about 1/32 of fp32 params, see :func:`pack_mask`), instead of one uint8 per
      weight (1/4): a bool for every leaf, or ``{parameter name or regex: bool}`` (leaves
      no key matches are packed). Packed masks shard like their params when the last
      axis is split 2, 4 or 8 ways, or on whole bytes (:func:`packing_aligned`). For
      other splits (e.g. 3 ways), ``init`` with placed params stores that leaf's mask
      unpacked, sharded like the param; a ``jit``-ted ``init`` cannot see shardings:
      give those leaves ``False`` here. Each leaf keeps the layout its state started with.
    layer_axes: ``{parameter name or regex: axis}`` of stacked (scanned) parameters,
      whose slices along ``axis`` are layers (see :mod:`prunax.layers`); axes named
      ``'layers'`` in flax boxed params are read without being declared.
  """

  sparsity: float | None = None
  sparsity_distribution_fn: Any = 'uniform'
  sparsity_type: Any = sparsity_types.Unstructured()
  scheduler: Any = sparsity_schedules.OneShotSchedule()
  seed: int = 0
  packed_masks: Any = True
  layer_axes: Any = None

  # Behaviour switches of algorithm families (class attributes, not fields).
  is_ste = False  # dense weights in the state, mask recomputed every step
  is_sparse_training = False  # masks at the target sparsity from init
  is_global = False  # one threshold across all pruned leaves
  scheduler_kind = 'pruning'  # config schedules: 'pruning' (one-shot/gradual), 'periodic', 'none'
  # On a mask-update step, move no weight but the ones the new masks remove (RigL's
  # reference code and jaxpruner skip that step's gradient update).
  skip_gradient_on_mask_update = False

  def __post_init__(self):
    self._resolve_jaxpruner_args()
    name = type(self).__name__
    if self.sparsity is not None:
      object.__setattr__(
        self,
        'sparsity',
        sparsity_distributions._check_sparsity(self.sparsity, 'the updater'),
      )
    _checks.assign(
      self,
      # A traced seed (one compiled step for every seed, as prunax compare does) is kept.
      seed=self.seed
      if isinstance(self.seed, jax.Array)
      else _checks.integer(self.seed, f'{name} seed', -(2**63), 2**63 - 1),
      packed_masks=_freeze_packing(self.packed_masks, f'{name} packed_masks'),
    )
    dist = sparsity_distributions.resolve(self.sparsity_distribution_fn)
    object.__setattr__(self, 'sparsity_distribution_fn', dist)
    object.__setattr__(self, 'sparsity_type', sparsity_types.from_string(self.sparsity_type))
    nm = self.sparsity_type
    if (
      isinstance(nm, sparsity_types.NByM)
      and self.sparsity is None
      and not isinstance(dist, sparsity_distributions.CustomMap)
    ):
      object.__setattr__(self, 'sparsity', nm.sparsity)  # N:M's own sparsity, 1 - n/m
    object.__setattr__(self, 'layer_axes', layers.freeze(self.layer_axes))
    for method in ('is_update_step', 'sparsity'):
      if not hasattr(self.scheduler, method):
        raise TypeError(
          f'scheduler must be a prunax.sparsity_schedules schedule (with '
          f'is_update_step and sparsity), got {self.scheduler!r}.'
        )
    if self.sparsity is None and not isinstance(
      dist, (sparsity_distributions.CustomMap, sparsity_distributions.ParamsOnly)
    ):
      raise ValueError(
        f'{type(self).__name__} needs a target sparsity in [0, 1): pass '
        'sparsity=..., or a mapping as sparsity_distribution_fn.'
      )
    if self.is_global and not isinstance(self.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(
        f'{type(self).__name__} supports only unstructured sparsity, got {self.sparsity_type!r}.'
      )
    if self.is_global and _is_erk(dist):
      raise ValueError(
        f'{type(self).__name__} chooses per-layer sparsities itself with one '
        'global threshold; use the "uniform" distribution (with a '
        'custom_sparsity_map for layers that differ), not ERK.'
      )
    if isinstance(nm, sparsity_types.NByM):
      self._check_n_by_m(dist)

  def _check_n_by_m(self, dist) -> None:
    """N:M fixes every pruned leaf's sparsity at ``1 - n/m`` (which an unset sparsity
    takes): another sparsity is an error, and so is ERK (whose per-leaf sparsities differ)."""
    nm = self.sparsity_type
    if self.sparsity is not None:
      nm.check_sparsity(self.sparsity, f'{type(self).__name__}(sparsity={self.sparsity!r})')
    if _is_erk(dist):
      raise ValueError(
        f"{nm!r} prunes every leaf to 1 - n/m = {nm.sparsity:g}, so ERK's "
        'per-leaf sparsities cannot apply; use the "uniform" distribution.'
      )

  # ----------------------------------------------------------------------------- hooks

  def calculate_scores(
    self,
    params: PyTree,
    sparse_state: SparseState | None = None,
    grads: PyTree | None = None,
    **kwargs,
  ) -> PyTree:
    """Scores of every weight; higher scores are kept. Algorithms override this.

    Args:
      params: the (candidate) weights.
      sparse_state: the optimizer's :class:`SparseState`, if any.
      grads: the gradients of this step, if any.
      **kwargs: algorithm-specific inputs.

    Returns:
      A tree like params (leaves that are not pruned may hold anything).
    """
    raise NotImplementedError

  def compute_masks(
    self,
    params: PyTree,
    sparsities: PyTree,
    sparse_state: SparseState | None = None,
    grads: PyTree | None = None,
    old_masks: PyTree | None = None,
    **kwargs,
  ) -> PyTree:
    """Boolean keep-masks at ``sparsities`` (a tree of per-leaf sparsities or None).

    ``old_masks`` (the stored masks, for drop-and-grow algorithms) are bool arrays or
    :class:`prunax.selection.Lazy` masks (``selection.materialize`` gives the array).
    ``kwargs`` (extra arguments of the wrapped ``update`` or of ``instant_sparsify``)
    reach :meth:`calculate_scores`.
    """
    del old_masks  # Used by drop-and-grow algorithms.
    scores = self.calculate_scores(params, sparse_state=sparse_state, grads=grads, **kwargs)
    return self.masks_from_scores(scores, sparsities)

  def leaf_mask(self, scores: Any, sparsity, axis: int | None = None) -> jax.Array:
    """Exact keep-mask of one leaf at ``sparsity`` with the sparsity type; with a layer
    ``axis``, every layer (slice) of a stacked leaf is at ``sparsity`` on its own."""
    if axis is None:
      return self.sparsity_type.mask(scores, sparsity)
    return selection.map_layers(lambda x: self.sparsity_type.mask(x, sparsity), axis, scores)

  def masks_from_scores(self, scores: PyTree, sparsities: PyTree) -> PyTree:
    """Exact keep-masks from scores: per leaf (per layer of stacked leaves) with the
    sparsity type, or globally."""
    axes = self.layer_axes_tree(scores)
    if not self.is_global:
      # All leaves at once (sparsity_types.*.masks): one selection loop for unstructured.
      flat_s, treedef = jax.tree.flatten(sparsities, is_leaf=_is_none)
      pruned = [i for i, s in enumerate(flat_s) if s is not None]
      flat_x, flat_a = treedef.flatten_up_to(scores), treedef.flatten_up_to(axes)
      masks = self.sparsity_type.masks(*[[f[i] for i in pruned] for f in (flat_x, flat_s, flat_a)])
      flat = [None] * len(flat_s)
      for i, m in zip(pruned, masks, strict=True):
        flat[i] = m
      return treedef.unflatten(flat)
    # Leaves at the distribution's target share one threshold; custom-map entries with
    # another sparsity are pruned on their own (0.0 keeps a leaf dense).
    flat_s, treedef = jax.tree.flatten(sparsities, is_leaf=_is_none)
    flat_x = treedef.flatten_up_to(scores)
    flat_a = treedef.flatten_up_to(axes)
    shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if isinstance(x, selection.Lazy) else x,
      scores,
    )
    static = treedef.flatten_up_to(self.target_sparsities(shapes))
    pooled = [s is not None and t == self.sparsity for s, t in zip(flat_s, static, strict=True)]
    chosen = [x for x, p in zip(flat_x, pooled, strict=True) if p]
    total = sum(math.prod(x.shape) for x in chosen)
    target = next((s for s, p in zip(flat_s, pooled, strict=True) if p), 0.0)
    it = iter(selection.global_topk_masks(chosen, total - sparsity_types.num_zeros(target, total)))
    return treedef.unflatten(
      [
        next(it) if p else (None if s is None else self.leaf_mask(x, s, a))
        for s, x, a, p in zip(flat_s, flat_x, flat_a, pooled, strict=True)
      ]
    )

  # ------------------------------------------------------------------------ sparsities

  def layer_axes_of(self, params: PyTree) -> dict[str, int]:
    """``{leaf name: layer axis}`` of the stacked leaves of ``params`` (declared with
    ``layer_axes`` or read from flax boxes); see :mod:`prunax.layers`."""
    return layers.resolve(params, self.layer_axes)

  def layer_axes_tree(self, tree: PyTree) -> PyTree:
    """A tree like ``tree`` (params or scores) of each leaf's layer axis (None: one layer)."""
    axes = self.layer_axes_of(tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef.unflatten([axes.get(sparsity_distributions.path_name(p)) for p, _ in flat])

  def target_sparsities(self, params: PyTree) -> PyTree:
    """Per-leaf final sparsities (floats, None for dense leaves), validated against params.

    A stacked leaf's sparsity is that of each of its layers."""
    axes = self.layer_axes_of(params)
    dist = self.sparsity_distribution_fn
    if axes and sparsity_distributions.accepts_layer_axes(dist):
      sparsities = dist(params, self.sparsity, layer_axes=axes)
    else:
      sparsities = dist(params, self.sparsity)
    for (name, s), (_, leaf) in zip(
      sparsity_distributions.named_leaves(sparsities, is_leaf=_is_none),
      sparsity_distributions.named_leaves(params),
      strict=True,
    ):
      if s is None:
        continue
      sparsity_distributions._check_sparsity(s, name)
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
          f'Parameter {name!r} has dtype {dtype}; only floating-point parameters '
          "can be pruned. Exclude it with the distribution's filter_fn."
        )
      self.sparsity_type.validate(layers.slice_shape(np.shape(leaf), axes.get(name)), name)
      self.sparsity_type.check_sparsity(s, f'parameter {name!r}')
    return sparsities

  def _warn_undeclared_stacks(self, params: PyTree, targets: PyTree) -> None:
    axes = self.layer_axes_of(params)
    for (name, s), (_, leaf) in zip(
      sparsity_distributions.named_leaves(targets, is_leaf=_is_none),
      sparsity_distributions.named_leaves(params),
      strict=True,
    ):
      if s is not None and name not in axes and layers.looks_stacked(name, leaf):
        warnings.warn(
          f'Parameter {name!r} of shape {tuple(np.shape(leaf))} looks like a stack of '
          'layers (scanned or vmapped) but has no layer axis: it is pruned as one tensor, '
          'so one layer can end up dense and the others empty. Declare its layer axis, e.g. '
          f'{type(self).__name__}(..., layer_axes={{{name!r}: 0}}), or use '
          'prunax.layers.layer_axes_from_flax on the boxed variables.',
          stacklevel=3,
        )

  def _sparsities_at(self, targets: PyTree, step) -> PyTree:
    return jax.tree.map(
      lambda s: None if s is None else self.scheduler.sparsity(step, s), targets, is_leaf=_is_none
    )

  # ---------------------------------------------------------------------- mask storage

  def packs(self, name: str) -> bool:
    """Whether the mask of parameter ``name`` is stored packed (see ``packed_masks``)."""
    if isinstance(self.packed_masks, bool):
      return self.packed_masks
    flags = dict(self.packed_masks)
    if name in flags:
      return flags[name]
    hits = {v for k, v in flags.items() if sparsity_distributions.matching_names(k, [name])}
    if len(hits) > 1:
      raise ValueError(
        f'packed_masks keys {sorted(flags)} give parameter {name!r} both True and False; '
        'make the patterns disjoint or name the parameter.'
      )
    return hits.pop() if hits else True

  def _store(self, masks: PyTree, like: PyTree = None) -> PyTree:
    """Boolean masks in their stored form: packed or uint8 per leaf (:meth:`packs`), or
    in the layout of the stored masks ``like`` (a state keeps the layout it started with)."""

    def store(path, m, *old):
      if m is None:
        return None
      packed = (
        old[0].shape != jnp.shape(m) if old else self.packs(sparsity_distributions.path_name(path))
      )
      return pack_mask(m) if packed else m.astype(jnp.uint8)

    trees = (masks,) if like is None else (masks, like)
    return jax.tree_util.tree_map_with_path(store, *trees, is_leaf=_is_none)

  def _key(self, sparse_state: SparseState | None, salt: int = 0) -> jax.Array:
    if sparse_state is None:
      return jax.random.fold_in(self._base_key(), salt)
    key = jax.random.wrap_key_data(sparse_state.rng, impl='threefry2x32')
    return jax.random.fold_in(jax.random.fold_in(key, sparse_state.count), salt)

  def _random_scores(self, params: PyTree, key: jax.Array) -> PyTree:
    """Lazy uniform scores per leaf (a hash of position and a per-leaf key, see
    :func:`prunax.selection.hash_uniform`), recomputed in every selection pass."""
    flat, treedef = jax.tree.flatten(params)
    flat_axes = treedef.flatten_up_to(self.layer_axes_tree(params))
    keys = jax.random.split(key, len(flat))
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    keys = keys.astype(jnp.uint32)

    def scores(x, key_data, axis):
      if axis is None:
        return selection.Lazy(selection.hash_uniform, x, key_data)
      # Stacked leaves: a stream per layer (the ids are sliced with the layer).
      shape = [1] * jnp.ndim(x)
      shape[axis] = jnp.shape(x)[axis]
      ids = jnp.arange(shape[axis], dtype=jnp.uint32).reshape(shape)
      return selection.Lazy(selection.hash_uniform_layers, x, key_data, ids)

    return treedef.unflatten(
      [
        scores(x, _xla_workarounds.leaf_row(keys, i), a)
        for i, (x, a) in enumerate(zip(flat, flat_axes, strict=True))
      ]
    )

  # --------------------------------------------------------------------------- init

  def init_masks(self, params: PyTree, targets: PyTree) -> PyTree:
    """Boolean masks at ``init``: all ones, or random at the target (sparse training)."""
    if self.is_sparse_training:
      scores = self._random_scores(params, self._key(None, salt=1))
      return self.masks_from_scores(scores, targets)
    return jax.tree.map(
      lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
      targets,
      params,
      is_leaf=_is_none,
    )

  def init_state(self, params: PyTree, inner_state: Any = None) -> SparseState:
    """The :class:`SparseState` for ``params`` around ``inner_state``."""
    targets = self.target_sparsities(params)
    self._warn_undeclared_stacks(params, targets)
    masks = self.init_masks(params, targets)
    # Masks that do not depend on the weights (all ones, random) would come out of a jitted
    # init replicated: each stored mask is tied to its param, so it is sharded like it.
    stored = jax.tree.map(
      lambda m, p: None if m is None else _shard_like_param(m, p),
      self._store(masks),
      params,
      is_leaf=_is_none,
    )
    return _stored(
      SparseState(
        inner_state=inner_state,
        masks=stored,
        count=jnp.zeros([], jnp.int32),
        rng=self._base_key(),
        # A copy: the state must not share buffers with params (train steps donate both).
        dense_params=jax.tree.map(jnp.copy, _pruned_only(masks, params)) if self.is_ste else None,
        thresholds=self.init_thresholds(params, targets),
        aux=self.init_aux(params, masks),
      )
    )

  def init_aux(self, params: PyTree, masks: PyTree) -> PyTree:
    """Initial ``SparseState.aux`` (None unless the algorithm keeps statistics)."""
    del params, masks
    return None

  def update_aux(self, aux: PyTree, grads: PyTree, masks: PyTree) -> PyTree:
    """``SparseState.aux`` after a step with raw gradients ``grads`` (before any mask
    update of the step, which reads the new value); unchanged by default."""
    del grads, masks
    return aux

  # ------------------------------------------------------------ STE-style hooks
  # Algorithms with dense weights in the state (``is_ste``) may override these.

  def init_thresholds(self, params: PyTree, targets: PyTree) -> PyTree:
    """Initial ``SparseState.thresholds`` (None unless the algorithm learns thresholds)."""
    del params, targets
    return None

  def transform_gradients(
    self, grads: PyTree, dense: PyTree, masks: PyTree, sparse_state: SparseState
  ) -> PyTree:
    """Gradients (taken at the sparse weights) fed to the inner optimizer of the dense
    weights. Identity: the straight-through estimator."""
    del dense, masks, sparse_state
    return grads

  def init_threshold_state(
    self, inner: optax.GradientTransformation, thresholds: PyTree, params: PyTree
  ) -> PyTree:
    """Initial ``SparseState.threshold_state``: the state of ``inner`` (the wrapped
    transformation) for ``thresholds``, if the algorithm trains them with it (None by
    default)."""
    del inner, thresholds, params
    return None

  def update_thresholds(
    self,
    grads: PyTree,
    dense: PyTree,
    masks: PyTree,
    sparse_state: SparseState,
    inner: optax.GradientTransformation,
  ) -> tuple[PyTree, PyTree]:
    """New ``SparseState.thresholds`` and ``threshold_state`` after a step (unchanged by
    default).

    Args:
      grads: the gradients of this step (taken at the sparse weights).
      dense: the dense weights the forward pass of this step was computed from (before
        the optimizer's update; params for leaves without dense weights).
      masks: the masks of this step.
      sparse_state: the state before the step.
      inner: the wrapped transformation (the weights' optimizer).
    """
    del grads, dense, masks, inner
    return sparse_state.thresholds, sparse_state.threshold_state

  def forward_params(self, dense: PyTree, masks: PyTree, sparse_state: SparseState) -> PyTree:
    """The weights the model sees for the pruned leaves: ``dense`` under ``masks``."""
    del sparse_state
    return map_masked(lambda m, d: jnp.where(m, d, 0).astype(d.dtype), masks, dense)

  # ------------------------------------------------------------------------- update

  def _is_update_step(self, step):
    return self.scheduler.is_update_step(step)

  def wrap_optax(
    self, inner: optax.GradientTransformation
  ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that applying its updates keeps the params sparse.

    Args:
      inner: any optax transformation (sgd, adam, chains, ``inject_hyperparams``...).

    Returns:
      A transformation whose state is a :class:`SparseState` and whose ``update`` needs
      ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, prunax
      >>> pruner = prunax.MagnitudePruning(
      ...   sparsity=0.5, scheduler=prunax.sparsity_schedules.OneShotSchedule()
      ... )
      >>> tx = pruner.wrap_optax(optax.adam(1e-2))  # the only change to a training loop
      >>> params = {'w': jnp.array([[0.1, -2.0], [3.0, -0.4]])}
      >>> opt_state = tx.init(params)
      >>> @jax.jit
      ... def step(params, opt_state):
      ...   grads = jax.grad(lambda p: jnp.sum(p['w'] ** 2))(params)
      ...   updates, opt_state = tx.update(grads, opt_state, params)  # params are needed
      ...   return optax.apply_updates(params, updates), opt_state
      >>> for _ in range(3):
      ...   params, opt_state = step(params, opt_state)
      >>> (params['w'] == 0).tolist()
      [[True, False], [False, True]]
    """
    inner = optax.with_extra_args_support(inner)
    update = functools.partial(_update, self, inner)
    if self.skip_gradients:
      update = updater_args.skip_on_mask_updates(self, update)
    return optax.GradientTransformationExtraArgs(functools.partial(_init, self, inner), update)

  def _candidate(self, inner, grads, state, params, masks, **extra):
    """Inner step: (candidate weights, inner updates, new inner state).

    STE-style algorithms run the inner optimizer on their dense weights (kept in the
    state for pruned leaves) with the gradients taken at the sparse weights; the others
    run it on ``params`` with the gradients of pruned weights masked out.
    """
    if self.is_ste:
      base = jax.tree.map(
        lambda d, p: p if d is None else d, state.dense_params, params, is_leaf=_is_none
      )
      grads = self.transform_gradients(grads, base, masks, state)
      updates, inner_state = inner.update(grads, state.inner_state, base, **extra)
      return optax.apply_updates(base, updates), updates, inner_state
    masked_grads = map_masked(lambda m, g: jnp.where(m, g, 0), masks, grads)
    updates, inner_state = inner.update(masked_grads, state.inner_state, params, **extra)
    candidate = jax.tree.map(
      lambda m, p, u: (p + u if m is None else jnp.where(m, p + u, 0)).astype(p.dtype),
      masks,
      params,
      updates,
      is_leaf=_is_none,
    )
    return candidate, updates, inner_state

  def _output(self, params, candidate, updates, masks, new_masks, state):
    """Updates that take ``params`` to the candidate weights under the new masks."""
    if self.is_ste:
      forward = self.forward_params(candidate, new_masks, state)
      return map_masked(lambda m, u, f, p: f - p, new_masks, updates, forward, params)
    return map_masked(
      lambda m, u, m_new, p: jnp.where(m & m_new, u, -p), masks, updates, new_masks, params
    )

  # ---------------------------------------------------------------- explicit hooks

  def _stored_masks(self, opt_state: PyTree, params: PyTree) -> PyTree:
    return unpack_masks(get_sparse_state(opt_state).masks, params)

  def pre_forward_update(self, params: PyTree, opt_state: PyTree) -> PyTree:
    """Params the forward pass should use: ``params`` under the current masks.

    Not needed with ``wrap_optax`` + ``optax.apply_updates`` (the params are already
    sparse); kept for hand-written loops, where it is idempotent.
    """
    return map_masked(
      lambda m, p: jnp.where(m, p, 0).astype(p.dtype), self._stored_masks(opt_state, params), params
    )

  def post_gradient_update(self, params: PyTree, opt_state: PyTree) -> PyTree:
    """Params after a gradient step, projected on the current masks (idempotent)."""
    return self.pre_forward_update(params, opt_state)

  def instant_sparsify(
    self, params: PyTree, grads: PyTree | None = None, **kwargs
  ) -> tuple[PyTree, PyTree]:
    """Prunes ``params`` to the target sparsity at once.

    Args:
      params: the weights.
      grads: gradients, for gradient-based scores.
      **kwargs: further inputs of :meth:`calculate_scores`.

    Returns:
      ``(sparse_params, masks)`` with boolean keep-masks (whatever ``packed_masks`` says
      about storage in the optimizer state), None for dense leaves.
    """
    targets = self.target_sparsities(params)
    masks = self.compute_masks(
      params, targets, grads=grads, old_masks=self.init_masks(params, targets), **kwargs
    )
    sparse = map_masked(lambda m, p: jnp.where(m, p, 0).astype(p.dtype), masks, params)
    return sparse, masks


class _NotParams:
  """Marks the parts of an optimizer state that are not like the params."""


def _reset_inactive(inner, inner_state, masks, params):
  """``inner_state`` with the per-weight state of inactive weights at its initial value.

  The per-weight leaves (those of the params' shape inside the params-like subtrees that
  ``optax.tree_utils.tree_map_params`` finds) take, where ``masks`` are False, the value
  the inner optimizer's own ``init`` gives them (zero for moments, the optimizer's own
  start for others, e.g. cocob), so a weight grown by a mask update starts afresh.
  Leaves of other shapes (factored moments, counters, scalars) and ``MaskedNode``
  entries (``optax.masked``, ``multi_transform``) are left alone.
  """
  keep = jax.tree.map(lambda m: True if m is None else m, masks, is_leaf=_is_none)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  # The masks at every params-like place of the state; _NotParams elsewhere.
  placed = optax.tree_utils.tree_map_params(
    inner,
    lambda v, k: _NotParams if is_masked(v) else k,
    inner_state,
    keep,
    transform_non_params=lambda _: _NotParams,
    is_leaf=is_masked,
  )
  fresh = inner.init(params)

  def reset(k, v, v0):
    if k is _NotParams or isinstance(k, bool) or not hasattr(v, 'shape'):
      return v
    if jnp.shape(v) != jnp.shape(k) or jnp.shape(v0) != jnp.shape(v):
      return v
    return jnp.where(k, v, v0.astype(v.dtype))

  return jax.tree.map(
    reset, placed, inner_state, fresh, is_leaf=lambda x: x is _NotParams or isinstance(x, bool)
  )


# Transformations whose place is outside the pruner (see wrap_optax).
_OUTSIDE = {
  'MultiStepsState': 'optax.MultiSteps(pruner.wrap_optax(tx), every_k_schedule=k): masks '
  'and the step count then advance once per real step, and RigL grows '
  'from the accumulated gradient, not from one micro-batch',
  'ApplyIfFiniteState': 'optax.apply_if_finite(pruner.wrap_optax(tx), max_consecutive_errors'
  '=n): it then sees the gradients of pruned weights too, and a '
  'skipped step leaves masks and the step count unchanged',
}


def _freeze_packing(value: Any, name: str) -> bool | tuple[tuple[str, bool], ...]:
  """``packed_masks`` validated: a bool, or a mapping frozen to sorted ``(key, bool)`` pairs."""
  if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
    value = dict(value)
  if not isinstance(value, Mapping):
    return _checks.boolean(value, name)
  for key, flag in value.items():
    if not isinstance(key, str):
      raise TypeError(f'{name} keys must be parameter names or regexes (str), got {key!r}.')
    _checks.boolean(flag, f'{name}[{key!r}]')
  return tuple(sorted(value.items()))


def _check_inner(inner_state) -> None:
  """Rejects transformations inside the pruner that belong outside it (see _OUTSIDE)."""
  found = []

  def visit(x):
    if type(x).__name__ in _OUTSIDE and type(x).__module__.startswith('optax'):
      found.append(type(x).__name__)
    return False

  jax.tree_util.tree_flatten(inner_state, is_leaf=visit)
  if found:
    raise ValueError(
      f'optax.{found[0][: -len("State")]} is wrapped inside the pruner; put it '
      f'outside: {_OUTSIDE[found[0]]}.'
    )


def _is_placeholder(params) -> bool:
  # optax.tree_utils.tree_map_params calls init with a stand-in for the params.
  return type(params).__name__ == '_ParamsPlaceholder'


@functools.lru_cache(maxsize=4096)
def _packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the mask of a param of ``shape`` packed by :func:`pack_mask`."""
  return tuple(jax.eval_shape(pack_mask, jax.ShapeDtypeStruct(shape, jnp.bool_)).shape)


def _check_params_unchanged(state: SparseState, params: PyTree) -> None:
  """Raises ValueError, naming the leaf, if ``params`` are not the params ``state`` was made
  for: another tree structure, or a pruned leaf whose shape does not give its stored mask's
  shape (or, for dense weights in the state, whose shape or dtype differs from theirs).

  Static (shapes only), so it costs nothing in a compiled step. A stored mask is read as
  one uint8 per weight when it has the param's shape, else as packed by :func:`pack_mask`
  (see :func:`lazy_mask`), so both shapes are accepted. A packed mask identifies every
  dimension but the last exactly, and the last up to its packing; unpacked masks and dense
  weights identify the shape exactly.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    masks = treedef.flatten_up_to(state.masks)
  except (ValueError, TypeError) as e:
    raise ValueError(
      'The params passed to update do not have the tree structure of the params '
      f'the optimizer state was initialised with: {e}'
    ) from None
  try:
    dense = treedef.flatten_up_to(state.dense_params)
  except (ValueError, TypeError):
    dense = [None] * len(flat)  # no dense weights in the state
  for (path, p), m, d in zip(flat, masks, dense, strict=True):
    if m is None:
      continue
    name = sparsity_distributions.path_name(path)
    shape, dtype = tuple(np.shape(p)), jnp.result_type(p)
    if d is not None and (tuple(np.shape(d)), jnp.result_type(d)) != (shape, dtype):
      raise ValueError(
        f'Parameter {name!r} is {dtype}{list(shape)} at update, but the optimizer '
        f'state was initialised for {jnp.result_type(d)}{list(np.shape(d))}; '
        'initialise the state again (tx.init) after changing the model.'
      )
    stored, packed = tuple(np.shape(m)), _packed_shape(shape) if shape else shape
    if stored not in (shape, packed):
      raise ValueError(
        f'Parameter {name!r} has shape {shape} at update, but its mask in the '
        f'optimizer state has shape {stored}, made for another shape (a param '
        f'of shape {shape} has a mask of shape {shape}, or {packed} packed); '
        'initialise the state again (tx.init) after changing the model.'
      )


def _skip_gradient_step(out, params, masks, new_masks, is_update):
  """On an update step: only the weights the new masks remove move (to 0); else ``out``."""
  if isinstance(is_update, (bool, np.bool_)) and not is_update:
    return out
  skipped = jax.tree.map(
    lambda m, m_new, p: (
      jnp.zeros_like(p) if m is None else jnp.where(m & m_new, 0, -p).astype(p.dtype)
    ),
    masks,
    new_masks,
    params,
    is_leaf=_is_none,
  )
  return jax.tree.map(lambda s, o: jnp.where(is_update, s, o), skipped, out)


def _init(updater: BaseUpdater, inner, params):
  inner_state = inner.init(params)
  if _is_placeholder(params):
    # For tree_map_params: the inner state's params-like parts are mapped; masks, dense
    # weights and thresholds (trees of the pruned params only) and the thresholds'
    # optimizer state count as non-params.
    return SparseState(inner_state, *[_NotParams] * (len(SparseState._fields) - 1))
  _check_inner(inner_state)
  # One compiled computation (cached per updater and shapes) rather than eager ops: the
  # selection loops of random initial masks took tens of seconds op by op. Inside a
  # caller's jit this is inlined.
  updater = _unpack_unaligned(updater, params)
  try:
    hash(updater)
  except TypeError:  # a traced field (a seed traced by the caller's jit): no cache key
    state = updater.init_state(params, inner_state)
  else:
    state = _jitted_init_state(updater, params, inner_state)
  threshold_state = updater.init_threshold_state(inner, _from_stored(state.thresholds), params)
  if threshold_state is None:
    return state
  return state._replace(threshold_state=threshold_state)


def _unpack_unaligned(updater: BaseUpdater, params: PyTree) -> BaseUpdater:
  """``updater`` storing unpacked the masks of placed params whose sharding splits the
  last axis where a packed mask cannot follow (:func:`packing_aligned`)."""
  unaligned = [
    name
    for name, p in sparsity_distributions.named_leaves(params)
    if isinstance(p, jax.Array)
    and not isinstance(p, jax.core.Tracer)
    and np.ndim(p) > 0
    and updater.packs(name)
    and not packing_aligned(np.shape(p)[-1], last_axis_shards(p))
  ]
  if not unaligned:
    return updater
  spec = updater.packed_masks
  spec = dict(spec) if isinstance(spec, tuple) else ({} if spec else {'.*': False})
  spec.update({re.escape(name): False for name in unaligned})
  return dataclasses.replace(updater, packed_masks=spec)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init_state(updater: BaseUpdater, params, inner_state) -> SparseState:
  return updater.init_state(params, inner_state)


def _update(updater: BaseUpdater, inner, grads, state: SparseState, params=None, **extra):
  if params is None:
    raise ValueError(
      'A prunax-wrapped transformation needs params: call tx.update(grads, opt_state, params).'
    )
  if not isinstance(state, SparseState):
    raise TypeError(
      f'Expected a prunax SparseState, got {type(state).__name__}; initialise '
      "the state with the wrapped transformation's init."
    )
  state = _unstored(state)
  _check_params_unchanged(state, params)
  targets = updater.target_sparsities(params)
  updater._warn_undeclared_stacks(params, targets)
  masks = unpack_masks(state.masks, params)
  raw_state = state
  if updater.is_ste:
    # Learned thresholds (AutoSparse) from the dense weights the forward pass used.
    old_dense = jax.tree.map(
      lambda d, p: p if d is None else d, state.dense_params, params, is_leaf=_is_none
    )
    thresholds, threshold_state = updater.update_thresholds(grads, old_dense, masks, state, inner)
    if thresholds is not None:
      # The optimizer's pass runs after the thresholds' reductions have read the old dense
      # weights, so XLA updates those in place instead of copying them.
      grads = _xla_workarounds.after(grads, thresholds)
  else:
    # The inner optimizer's per-weight state (moments) of inactive weights is held at its
    # initial value, so a weight grown by a mask update starts afresh. Resetting the input
    # state under the stored masks fuses into the optimizer's own pass.
    state = state._replace(
      inner_state=_reset_inactive(inner, state.inner_state, masks, params),
      aux=updater.update_aux(state.aux, grads, masks),
    )
    raw_state = raw_state._replace(aux=state.aux)
  candidate, updates, inner_state = updater._candidate(inner, grads, state, params, masks, **extra)
  sparsities = updater._sparsities_at(targets, state.count)

  if updater.is_ste:
    # STE-style: the mask is recomputed from the dense weights at every step.
    state = state._replace(thresholds=thresholds, threshold_state=threshold_state)
    new_masks = updater.compute_masks(
      candidate, sparsities, sparse_state=state, grads=grads, old_masks=masks, **extra
    )
    stored = updater._store(new_masks, like=state.masks)
  else:
    is_update = updater._is_update_step(state.count)

    def fresh_masks(_):
      # The candidate weights are recomputed inside the branch, so that steps without a
      # mask update stay one fused elementwise pass (a cond operand would be materialised).
      # Scores come from the step's inputs only (the params the model saw, zero outside
      # the masks after any wrapped step, and their gradients): a computed operand would
      # be materialised for the cond, and a buffer the optimizer updates in place (its
      # moments) would be copied.
      old = lazy_masks(raw_state.masks, params)
      new = updater.compute_masks(
        params, sparsities, sparse_state=raw_state, grads=grads, old_masks=old, **extra
      )
      return updater._store(new, like=raw_state.masks)

    # Steps without a mask update keep the stored (possibly packed) masks as they are.
    if isinstance(is_update, (bool, np.bool_)) and not is_update:
      stored = state.masks  # A schedule that never updates: nothing to trace or compile.
    else:
      stored = jax.lax.cond(is_update, fresh_masks, lambda _: state.masks, None)
    new_masks = unpack_masks(stored, params)

  out = updater._output(params, candidate, updates, masks, new_masks, state)
  if updater.skip_gradient_on_mask_update and not updater.is_ste:
    out = _skip_gradient_step(out, params, masks, new_masks, is_update)
  new_state = state._replace(
    inner_state=inner_state,
    masks=stored,
    count=state.count + 1,
    dense_params=_pruned_only(new_masks, candidate) if updater.is_ste else None,
  )
  return out, _stored(new_state)


def __getattr__(name: str):
  # jaxpruner defines NoPruning next to BaseUpdater (`jaxpruner.base_updater.NoPruning`);
  # prunax's lives with the algorithms, which import this module.
  if name == 'NoPruning':
    from prunax.algorithms import NoPruning

    return NoPruning
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

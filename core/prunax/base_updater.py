"""The pruning engine: a self-sufficient Optax wrapper and the base class of algorithms.

``tx = updater.wrap_optax(inner)`` returns a transformation whose updates, applied with
``optax.apply_updates``, leave the params exactly as sparse as the algorithm says, with no
other call. For a step with gradients ``g`` at params ``p`` (the params the model saw):

1. The inner optimizer runs on the masked gradients ``g * m`` (dense gradients for STE),
   giving ``u``. Its per-weight state (moments) of inactive weights is held at zero: it is
   zeroed under ``m`` as the optimizer reads it, so a weight that becomes active again
   starts with fresh moments.
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
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import selection
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types

PyTree = Any


class SparseState(NamedTuple):
  """Optimizer state of a wrapped transformation.

  Attributes:
    inner_state: state of the wrapped optax transformation.
    masks: tree like params; 1-bit keep-masks packed along the last axis (or one uint8 per
      weight with ``packed_masks=False``), None for leaves that are not pruned.
    count: int32 number of updates done.
    rng: uint32 PRNG key data of shape (2,) (the key is folded with ``count`` when used).
    dense_params: the dense weights of STE-style algorithms, else None.
    thresholds: per-leaf learnable thresholds (AutoSparse), else None.
    aux: per-step statistics an algorithm keeps (SNFS: momentum of the gradients), else
      None; see :meth:`BaseUpdater.update_aux`.
  """

  inner_state: Any
  masks: Any
  count: jax.Array
  rng: jax.Array
  dense_params: Any = None
  thresholds: Any = None
  aux: Any = None


def _is_none(x) -> bool:
  return x is None


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
    raise ValueError('No prunax SparseState found in the optimizer state; was the optimizer '
                     'built with updater.wrap_optax(...)?')
  return found[0]


# Bit of element e (0..31) of a row of 32 in the little-endian uint32 word of its 4 packed
# bytes: byte e // 8, most significant bit first (numpy's packbits order).
_ROW_SHIFTS = np.array([8 * (e // 8) + 7 - e % 8 for e in range(32)], np.uint32)


def pack_mask(mask: jax.Array) -> jax.Array:
  """Packs a boolean mask into uint8 bits along its last axis (shape ``(..., ceil(d/8))``).

  The bits are numpy's ``packbits`` (most significant bit first). When the last axis
  holds a multiple of 32 weights they are packed 32 at a time into a uint32 word, which
  keeps the packing a plain loop over rows of the flat mask.
  """
  mask = mask.astype(bool)
  shape = jnp.shape(mask)
  if not shape or shape[-1] % 32:
    return jnp.packbits(mask, axis=-1)
  # Only the last axis is split, so the packed mask keeps the mask's sharding.
  bits = mask.reshape(shape[:-1] + (shape[-1] // 32, 32)).astype(jnp.uint32) << _ROW_SHIFTS
  words = jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is an OR
  packed = jax.lax.bitcast_convert_type(words, jnp.uint8)  # (..., d // 32, 4), little-endian
  return packed.reshape(shape[:-1] + (shape[-1] // 8,))


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_mask` for a parameter of ``shape``; returns a bool mask."""
  return jnp.unpackbits(packed, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def _packed_bits_at(packed: jax.Array, shape: tuple[int, ...], stride: int) -> jax.Array:
  """Bits of every ``stride``-th weight (flat order) of a mask packed by :func:`pack_mask`."""
  d = shape[-1]
  flat = jnp.arange(0, math.prod(shape), stride)
  row, col = flat // d, flat % d
  byte = packed.reshape(-1, packed.shape[-1])[row, col // 8]
  return ((byte >> (7 - col % 8).astype(jnp.uint8)) & 1).astype(bool)


def _packed_rows(packed: jax.Array) -> jax.Array:
  """A packed mask whose last axis has a multiple of 32 weights, as bool ``(n // 32, 32)``."""
  words = jax.lax.bitcast_convert_type(packed.reshape(-1, 4), jnp.uint32)
  return ((words[:, None] >> _ROW_SHIFTS) & 1).astype(bool)


def lazy_masks(masks: PyTree, params: PyTree) -> PyTree:
  """Stored masks as :class:`prunax.selection.Lazy` boolean masks (None stays None).

  Unpacking then happens inside whatever reads them (a selection pass, an elementwise
  update), so no unpacked copy is stored.
  """
  return jax.tree.map(lambda m, p: None if m is None else lazy_mask(m, jnp.shape(p)),
                      masks, params, is_leaf=_is_none)


def lazy_mask(stored: jax.Array, shape: tuple[int, ...]) -> selection.Lazy:
  """One stored mask (uint8, or packed by :func:`pack_mask`) as a lazy bool mask."""
  shape = tuple(shape)
  if stored.shape == shape:
    return selection.Lazy(lambda x: x.astype(bool), stored)
  return selection.Lazy(lambda x: unpack_mask(x, shape), stored, shape=shape,
                        sample=lambda stride, x: _packed_bits_at(x, shape, stride),
                        rows=_packed_rows if shape[-1] % 32 == 0 else None)


def unpack_masks(masks: PyTree, params: PyTree) -> PyTree:
  """Boolean masks from stored masks (uint8 or packed), given params for the shapes."""
  return jax.tree.map(lambda m: None if m is None else selection.materialize(m),
                      lazy_masks(masks, params), is_leaf=_is_none)


def bool_masks(opt_state: PyTree, params: PyTree) -> PyTree:
  """Boolean keep-masks of the :class:`SparseState` in ``opt_state`` (None: dense leaf)."""
  return unpack_masks(get_sparse_state(opt_state).masks, params)


@dataclasses.dataclass(frozen=True)
class BaseUpdater:
  """Base class of pruning and sparse-training algorithms.

  An algorithm overrides :meth:`calculate_scores` (and, for drop-and-grow methods,
  :meth:`compute_masks`). Instances are immutable and hashable, so they can be static
  arguments of ``jax.jit``.

  Attributes:
    sparsity: target sparsity in [0, 1) (distributed over leaves by
      ``sparsity_distribution_fn``). Not needed when the distribution is a mapping.
    sparsity_distribution_fn: ``'uniform'``, ``'erk'``, a mapping from parameter name
      (or regex) to sparsity, or any callable ``fn(params, sparsity) -> tree``.
    sparsity_type: a :mod:`prunax.sparsity_types` structure or its string form.
    scheduler: a :mod:`prunax.sparsity_schedules` schedule.
    seed: seed of the RNG key kept in the state (random scores, random initial masks).
    packed_masks: store masks as 1 bit per weight, packed along the last axis (the
      default: 1/32 of fp32 params), instead of one uint8 per weight (1/4).
  """

  sparsity: float | None = None
  sparsity_distribution_fn: Any = 'uniform'
  sparsity_type: Any = sparsity_types.Unstructured()
  scheduler: Any = sparsity_schedules.OneShotSchedule()
  seed: int = 0
  packed_masks: bool = True

  # Behaviour switches of algorithm families (class attributes, not fields).
  is_ste = False  # dense weights in the state, mask recomputed every step
  is_sparse_training = False  # masks at the target sparsity from init
  is_global = False  # one threshold across all pruned leaves
  scheduler_kind = 'pruning'  # config schedules: 'pruning' (one-shot/gradual), 'periodic', 'none'
  # On a mask-update step, move no weight but the ones the new masks remove (RigL's
  # reference code and jaxpruner skip that step's gradient update).
  skip_gradient_on_mask_update = False

  def __post_init__(self):
    if self.sparsity is not None:
      sparsity_distributions._check_sparsity(self.sparsity, 'the updater')  # pylint: disable=protected-access
    dist = sparsity_distributions.resolve(self.sparsity_distribution_fn)
    object.__setattr__(self, 'sparsity_distribution_fn', dist)
    object.__setattr__(self, 'sparsity_type', sparsity_types.from_string(self.sparsity_type))
    for method in ('is_update_step', 'sparsity'):
      if not hasattr(self.scheduler, method):
        raise TypeError(f'scheduler must be a prunax.sparsity_schedules schedule (with '
                        f'is_update_step and sparsity), got {self.scheduler!r}.')
    if self.sparsity is None and not isinstance(dist, sparsity_distributions.CustomMap):
      raise ValueError(f'{type(self).__name__} needs a target sparsity in [0, 1): pass '
                       'sparsity=..., or a mapping as sparsity_distribution_fn.')
    if self.is_global and not isinstance(self.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(f'{type(self).__name__} supports only unstructured sparsity, got '
                       f'{self.sparsity_type!r}.')
    if self.is_global and _is_erk(dist):
      raise ValueError(f'{type(self).__name__} chooses per-layer sparsities itself with one '
                       'global threshold; use the "uniform" distribution (with a '
                       'custom_sparsity_map for layers that differ), not ERK.')

  # ----------------------------------------------------------------------------- hooks

  def calculate_scores(self, params: PyTree, sparse_state: SparseState | None = None,
                       grads: PyTree | None = None, **kwargs) -> PyTree:
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

  def compute_masks(self, params: PyTree, sparsities: PyTree,
                    sparse_state: SparseState | None = None, grads: PyTree | None = None,
                    old_masks: PyTree | None = None) -> PyTree:
    """Boolean keep-masks at ``sparsities`` (a tree of per-leaf sparsities or None).

    ``old_masks`` (the stored masks, for drop-and-grow algorithms) are bool arrays or
    :class:`prunax.selection.Lazy` masks (``selection.materialize`` gives the array).
    """
    del old_masks  # Used by drop-and-grow algorithms.
    scores = self.calculate_scores(params, sparse_state=sparse_state, grads=grads)
    return self.masks_from_scores(scores, sparsities)

  def masks_from_scores(self, scores: PyTree, sparsities: PyTree) -> PyTree:
    """Exact keep-masks from scores: per leaf with the sparsity type, or globally."""
    if not self.is_global:
      return jax.tree.map(
          lambda s, x: None if s is None else self.sparsity_type.mask(x, s),
          sparsities, scores, is_leaf=_is_none)
    # Leaves at the distribution's target share one threshold; custom-map entries with
    # another sparsity are pruned on their own (0.0 keeps a leaf dense).
    flat_s, treedef = jax.tree.flatten(sparsities, is_leaf=_is_none)
    flat_x = treedef.flatten_up_to(scores)
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)
        if isinstance(x, selection.Lazy) else x, scores)
    static = treedef.flatten_up_to(self.target_sparsities(shapes))
    pooled = [s is not None and t == self.sparsity for s, t in zip(flat_s, static)]
    chosen = [x for x, p in zip(flat_x, pooled) if p]
    total = sum(math.prod(x.shape) for x in chosen)
    target = next((s for s, p in zip(flat_s, pooled) if p), 0.0)
    it = iter(selection.global_topk_masks(chosen, total - sparsity_types.num_zeros(target, total)))
    return treedef.unflatten([
        next(it) if p else (None if s is None else self.sparsity_type.mask(x, s))
        for s, x, p in zip(flat_s, flat_x, pooled)])

  # ------------------------------------------------------------------------ sparsities

  def target_sparsities(self, params: PyTree) -> PyTree:
    """Per-leaf final sparsities (floats, None for dense leaves), validated against params."""
    sparsities = self.sparsity_distribution_fn(params, self.sparsity)
    for (name, s), (_, leaf) in zip(
        sparsity_distributions.named_leaves(sparsities, is_leaf=_is_none),
        sparsity_distributions.named_leaves(params)):
      if s is None:
        continue
      sparsity_distributions._check_sparsity(s, name)  # pylint: disable=protected-access
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f'Parameter {name!r} has dtype {dtype}; only floating-point parameters '
                        'can be pruned. Exclude it with the distribution\'s filter_fn.')
      self.sparsity_type.validate(tuple(np.shape(leaf)), name)
    return sparsities

  def _sparsities_at(self, targets: PyTree, step) -> PyTree:
    return jax.tree.map(lambda s: None if s is None else self.scheduler.sparsity(step, s),
                        targets, is_leaf=_is_none)

  # ---------------------------------------------------------------------- mask storage

  def _store(self, masks: PyTree) -> PyTree:
    if self.packed_masks:
      return map_masked(pack_mask, masks)
    return map_masked(lambda m: m.astype(jnp.uint8), masks)

  def _key(self, sparse_state: SparseState | None, salt: int = 0) -> jax.Array:
    if sparse_state is None:
      return jax.random.fold_in(jax.random.PRNGKey(self.seed), salt)
    key = jax.random.wrap_key_data(sparse_state.rng, impl='threefry2x32')
    return jax.random.fold_in(jax.random.fold_in(key, sparse_state.count), salt)

  def _random_scores(self, params: PyTree, key: jax.Array) -> PyTree:
    """Lazy uniform scores per leaf (a hash of position and a per-leaf key, see
    :func:`prunax.selection.hash_uniform`), recomputed in every selection pass."""
    flat, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(flat))
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.key_data(keys)
    keys = keys.astype(jnp.uint32)
    # The trailing 0 becomes a traced 0 inside selection passes (see hash_uniform).
    return treedef.unflatten([selection.Lazy(selection.hash_uniform, x, keys[i], jnp.int32(0))
                              for i, x in enumerate(flat)])

  # --------------------------------------------------------------------------- init

  def init_masks(self, params: PyTree, targets: PyTree) -> PyTree:
    """Boolean masks at ``init``: all ones, or random at the target (sparse training)."""
    if self.is_sparse_training:
      scores = self._random_scores(params, self._key(None, salt=1))
      return self.masks_from_scores(scores, targets)
    return jax.tree.map(lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
                        targets, params, is_leaf=_is_none)

  def init_state(self, params: PyTree, inner_state: Any) -> SparseState:
    """The :class:`SparseState` for ``params`` around ``inner_state``."""
    targets = self.target_sparsities(params)
    masks = self.init_masks(params, targets)
    return SparseState(
        inner_state=inner_state,
        masks=self._store(masks),
        count=jnp.zeros([], jnp.int32),
        rng=jax.random.PRNGKey(self.seed),
        # A copy: the state must not share buffers with params (train steps donate both).
        dense_params=jax.tree.map(jnp.copy, _pruned_only(masks, params)) if self.is_ste else None,
        thresholds=self.init_thresholds(params, targets),
        aux=self.init_aux(params, masks))

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

  def transform_gradients(self, grads: PyTree, dense: PyTree, masks: PyTree,
                          sparse_state: SparseState) -> PyTree:
    """Gradients (taken at the sparse weights) fed to the inner optimizer of the dense
    weights. Identity: the straight-through estimator."""
    del dense, masks, sparse_state
    return grads

  def update_thresholds(self, grads: PyTree, dense: PyTree, masks: PyTree,
                        sparse_state: SparseState) -> PyTree:
    """New ``SparseState.thresholds`` after a step (unchanged by default).

    Args:
      grads: the gradients of this step (taken at the sparse weights).
      dense: the dense weights the forward pass of this step was computed from (before
        the optimizer's update; params for leaves without dense weights).
      masks: the masks of this step.
      sparse_state: the state before the step.
    """
    del grads, dense, masks
    return sparse_state.thresholds

  def forward_params(self, dense: PyTree, masks: PyTree, sparse_state: SparseState) -> PyTree:
    """The weights the model sees for the pruned leaves: ``dense`` under ``masks``."""
    del sparse_state
    return map_masked(lambda m, d: jnp.where(m, d, 0).astype(d.dtype), masks, dense)

  # ------------------------------------------------------------------------- update

  def _is_update_step(self, step):
    return self.scheduler.is_update_step(step)

  def wrap_optax(self, inner: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that applying its updates keeps the params sparse.

    Args:
      inner: any optax transformation (sgd, adam, chains, ``inject_hyperparams``...).

    Returns:
      A transformation whose state is a :class:`SparseState` and whose ``update`` needs
      ``params``.
    """
    inner = optax.with_extra_args_support(inner)
    return optax.GradientTransformationExtraArgs(
        functools.partial(_init, self, inner), functools.partial(_update, self, inner))

  def _candidate(self, inner, grads, state, params, masks, **extra):
    """Inner step: (candidate weights, inner updates, new inner state).

    STE-style algorithms run the inner optimizer on their dense weights (kept in the
    state for pruned leaves) with the gradients taken at the sparse weights; the others
    run it on ``params`` with the gradients of pruned weights masked out.
    """
    if self.is_ste:
      base = jax.tree.map(lambda d, p: p if d is None else d, state.dense_params, params,
                          is_leaf=_is_none)
      grads = self.transform_gradients(grads, base, masks, state)
      updates, inner_state = inner.update(grads, state.inner_state, base, **extra)
      return optax.apply_updates(base, updates), updates, inner_state
    masked_grads = map_masked(lambda m, g: jnp.where(m, g, 0), masks, grads)
    updates, inner_state = inner.update(masked_grads, state.inner_state, params, **extra)
    candidate = jax.tree.map(
        lambda m, p, u: (p + u if m is None else jnp.where(m, p + u, 0)).astype(p.dtype),
        masks, params, updates, is_leaf=_is_none)
    return candidate, updates, inner_state

  def _output(self, params, candidate, updates, masks, new_masks, state):
    """Updates that take ``params`` to the candidate weights under the new masks."""
    if self.is_ste:
      forward = self.forward_params(candidate, new_masks, state)
      return map_masked(lambda m, u, f, p: f - p, new_masks, updates, forward, params)
    return map_masked(lambda m, u, m_new, p: jnp.where(m & m_new, u, -p), masks, updates,
                      new_masks, params)

  # ---------------------------------------------------------------- explicit hooks

  def _stored_masks(self, opt_state: PyTree, params: PyTree) -> PyTree:
    return unpack_masks(get_sparse_state(opt_state).masks, params)

  def pre_forward_update(self, params: PyTree, opt_state: PyTree) -> PyTree:
    """Params the forward pass should use: ``params`` under the current masks.

    Not needed with ``wrap_optax`` + ``optax.apply_updates`` (the params are already
    sparse); kept for hand-written loops, where it is idempotent.
    """
    return map_masked(lambda m, p: jnp.where(m, p, 0).astype(p.dtype),
                      self._stored_masks(opt_state, params), params)

  def post_gradient_update(self, params: PyTree, opt_state: PyTree) -> PyTree:
    """Params after a gradient step, projected on the current masks (idempotent)."""
    return self.pre_forward_update(params, opt_state)

  def instant_sparsify(self, params: PyTree, grads: PyTree | None = None
                       ) -> tuple[PyTree, PyTree]:
    """Prunes ``params`` to the target sparsity at once.

    Args:
      params: the weights.
      grads: gradients, for gradient-based scores.

    Returns:
      ``(sparse_params, masks)`` with boolean keep-masks (whatever ``packed_masks`` says
      about storage in the optimizer state), None for dense leaves.
    """
    targets = self.target_sparsities(params)
    masks = self.compute_masks(params, targets, grads=grads,
                               old_masks=self.init_masks(params, targets))
    sparse = map_masked(lambda m, p: jnp.where(m, p, 0).astype(p.dtype), masks, params)
    return sparse, masks


def _zero_inactive(inner, inner_state, masks):
  """``inner_state`` with the per-weight leaves zeroed where ``masks`` are False."""
  keep = jax.tree.map(lambda m: True if m is None else m, masks, is_leaf=_is_none)
  return optax.tree_utils.tree_map_params(
      inner, lambda v, k: jnp.where(k, v, jnp.zeros_like(v)) if jnp.ndim(v) else v,
      inner_state, keep, transform_non_params=lambda v: v)


def _skip_gradient_step(out, params, masks, new_masks, is_update):
  """On an update step: only the weights the new masks remove move (to 0); else ``out``."""
  if isinstance(is_update, (bool, np.bool_)) and not is_update:
    return out
  skipped = jax.tree.map(
      lambda m, m_new, p: jnp.zeros_like(p) if m is None else jnp.where(m & m_new, 0, -p).astype(
          p.dtype), masks, new_masks, params, is_leaf=_is_none)
  return jax.tree.map(lambda s, o: jnp.where(is_update, s, o), skipped, out)


def _init(updater: BaseUpdater, inner, params):
  return updater.init_state(params, inner.init(params))


def _update(updater: BaseUpdater, inner, grads, state: SparseState, params=None, **extra):
  if params is None:
    raise ValueError('A prunax-wrapped transformation needs params: call '
                     'tx.update(grads, opt_state, params).')
  if not isinstance(state, SparseState):
    raise TypeError(f'Expected a prunax SparseState, got {type(state).__name__}; initialise '
                    'the state with the wrapped transformation\'s init.')
  targets = updater.target_sparsities(params)
  masks = unpack_masks(state.masks, params)
  raw_state = state
  if updater.is_ste:
    # Learned thresholds (AutoSparse) from the dense weights the forward pass used.
    old_dense = jax.tree.map(lambda d, p: p if d is None else d, state.dense_params, params,
                             is_leaf=_is_none)
    thresholds = updater.update_thresholds(grads, old_dense, masks, state)
    if thresholds is not None:
      # The optimizer's pass reads a 0 computed from the new thresholds, so it runs after
      # their reductions have read the old dense weights: XLA can then update those in
      # place, where it would otherwise copy them (it cannot order independent readers).
      zero = sum(jnp.minimum(jnp.abs(t), 0).astype(jnp.float32)
                 for t in jax.tree.leaves(thresholds))
      grads = jax.tree.map(lambda g: g + zero.astype(g.dtype), grads)
  else:
    # The inner optimizer's per-weight state (moments) of inactive weights is held at zero,
    # so a weight grown by a mask update starts with fresh moments. Zeroing the input state
    # under the stored masks fuses into the optimizer's own pass.
    state = state._replace(inner_state=_zero_inactive(inner, state.inner_state, masks),
                           aux=updater.update_aux(state.aux, grads, masks))
    raw_state = raw_state._replace(aux=state.aux)
  candidate, updates, inner_state = updater._candidate(  # pylint: disable=protected-access
      inner, grads, state, params, masks, **extra)
  sparsities = updater._sparsities_at(targets, state.count)  # pylint: disable=protected-access

  if updater.is_ste:
    # STE-style: the mask is recomputed from the dense weights at every step.
    state = state._replace(thresholds=thresholds)
    new_masks = updater.compute_masks(candidate, sparsities, sparse_state=state, grads=grads,
                                      old_masks=masks)
    stored = updater._store(new_masks)  # pylint: disable=protected-access
  else:
    is_update = updater._is_update_step(state.count)  # pylint: disable=protected-access

    def fresh_masks(_):
      # The candidate weights are recomputed inside the branch, so that steps without a
      # mask update stay one fused elementwise pass (a cond operand would be materialised).
      # Scores come from the step's inputs only (the params the model saw, zero outside
      # the masks after any wrapped step, and their gradients): a computed operand would
      # be materialised for the cond, and a buffer the optimizer updates in place (its
      # moments) would be copied.
      old = lazy_masks(raw_state.masks, params)
      new = updater.compute_masks(params, sparsities, sparse_state=raw_state, grads=grads,
                                  old_masks=old)
      return updater._store(new)  # pylint: disable=protected-access

    # Steps without a mask update keep the stored (possibly packed) masks as they are.
    if isinstance(is_update, (bool, np.bool_)) and not is_update:
      stored = state.masks  # A schedule that never updates: nothing to trace or compile.
    else:
      stored = jax.lax.cond(is_update, fresh_masks, lambda _: state.masks, None)
    new_masks = unpack_masks(stored, params)

  out = updater._output(  # pylint: disable=protected-access
      params, candidate, updates, masks, new_masks, state)
  if updater.skip_gradient_on_mask_update and not updater.is_ste:
    out = _skip_gradient_step(out, params, masks, new_masks, is_update)
  new_state = state._replace(
      inner_state=inner_state,
      masks=stored,
      count=state.count + 1,
      dense_params=_pruned_only(new_masks, candidate) if updater.is_ste else None)
  return out, new_state


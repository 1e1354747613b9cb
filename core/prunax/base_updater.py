"""The base class of algorithms: what an algorithm is made of, and its hooks.

``tx = updater.wrap_optax(inner)`` returns a transformation whose updates, applied with
``optax.apply_updates``, leave the params exactly as sparse as the algorithm says, with no
other call (see :mod:`prunax.engines` for what a step does). An algorithm is a frozen
dataclass composed of:

* an ``engine`` (:func:`prunax.engines.masked_training` or
  :func:`prunax.engines.straight_through`), the optax ``init``/``update`` pair;
* a ``selection_strategy`` (:class:`prunax.strategies.PerLeaf` or
  :class:`prunax.strategies.GlobalThreshold`), how scores become masks;
* its hooks (:meth:`BaseUpdater.calculate_scores`, :meth:`BaseUpdater.compute_masks`,
  :meth:`BaseUpdater.init_masks`) and its own state
  (:meth:`BaseUpdater.init_algorithm_state`).

Mask storage lives in :mod:`prunax.masks`, the optimizer state in :mod:`prunax.state`;
their names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import _checks
from prunax import engines
from prunax import layers
from prunax import masks as masks_lib
from prunax import random_masks as random_masks_lib
from prunax import selection
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax import strategies
from prunax.compat import updater_args
from prunax.engines import compiled_outside_trace
from prunax.masks import apply_mask
from prunax.masks import last_axis_shards
from prunax.masks import lazy_mask
from prunax.masks import lazy_masks
from prunax.masks import pack_mask
from prunax.masks import packing_aligned
from prunax.masks import unpack_mask
from prunax.masks import unpack_masks
from prunax.state import SparseState
from prunax.state import bool_masks
from prunax.state import get_sparse_state
from prunax.tree_util import apply_to_pruned
from prunax.tree_util import is_none
from prunax.tree_util import is_unpruned
from prunax.tree_util import map_masked
from prunax.tree_util import to_stored

PyTree = Any

__all__ = [
  'BaseUpdater',
  'SparseState',
  'apply_mask',
  'bool_masks',
  'get_sparse_state',
  'is_unpruned',
  'last_axis_shards',
  'lazy_mask',
  'lazy_masks',
  'map_masked',
  'pack_mask',
  'packing_aligned',
  'unpack_mask',
  'unpack_masks',
]


@dataclasses.dataclass(frozen=True)
class BaseUpdater(updater_args.JaxprunerArgs):
  """Base class of pruning and sparse-training algorithms.

  An algorithm overrides :meth:`calculate_scores` (and, for drop-and-grow methods,
  :meth:`compute_masks`). It is composed from parts named in its class: ``engine`` (how a
  step trains: :func:`prunax.engines.masked_training`, the default, or
  :func:`prunax.engines.straight_through`), ``selection_strategy`` (per leaf, the default,
  or one global threshold: :mod:`prunax.strategies`) and its own state
  (:meth:`init_algorithm_state`). Instances are immutable and hashable, so they can be
  static arguments of ``jax.jit``.

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

  # The parts an algorithm is composed of (class attributes, not fields).
  engine = staticmethod(engines.masked_training)
  selection_strategy = strategies.PerLeaf()
  # On a mask-update step, move no weight but the ones the new masks remove (RigL's
  # reference code and jaxpruner skip that step's gradient update).
  skip_gradient_on_mask_update = False

  def __post_init__(self):
    self.resolve_jaxpruner_args()
    name = type(self).__name__
    if self.sparsity is not None:
      object.__setattr__(
        self,
        'sparsity',
        sparsity_distributions.check_sparsity(self.sparsity, 'the updater'),
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
    self.selection_strategy.check(self)
    if isinstance(nm, sparsity_types.NByM):
      self._check_n_by_m(dist)

  def _check_n_by_m(self, dist) -> None:
    """N:M fixes every pruned leaf's sparsity at ``1 - n/m`` (which an unset sparsity
    takes): another sparsity is an error, and so is ERK (whose per-leaf sparsities differ)."""
    nm = self.sparsity_type
    if self.sparsity is not None:
      nm.check_sparsity(self.sparsity, f'{type(self).__name__}(sparsity={self.sparsity!r})')
    if strategies.is_erk(dist):
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
    masks = self.compute_lazy_masks(params, sparsities, sparse_state, grads, old_masks, **kwargs)
    return selection.materialize_all(masks)

  def compute_lazy_masks(
    self,
    params: PyTree,
    sparsities: PyTree,
    sparse_state: SparseState | None = None,
    grads: PyTree | None = None,
    old_masks: PyTree | None = None,
    **kwargs,
  ) -> PyTree:
    """:meth:`compute_masks` with masks that may be :class:`prunax.selection.Lazy` (a
    threshold comparison evaluated where it is read): :meth:`store_masks` evaluates and
    packs alike ones together. An algorithm overrides this or :meth:`compute_masks`."""
    del old_masks  # Used by drop-and-grow algorithms.
    scores = self.calculate_scores(params, sparse_state=sparse_state, grads=grads, **kwargs)
    return self.masks_from_scores(scores, sparsities, lazy=True)

  def new_masks(
    self,
    params: PyTree,
    sparsities: PyTree,
    sparse_state: SparseState | None = None,
    grads: PyTree | None = None,
    old_masks: PyTree | None = None,
    **kwargs,
  ) -> PyTree:
    """The masks of a mask update as the engines take them: :meth:`compute_lazy_masks`
    (masks may be :class:`prunax.selection.Lazy`, so :meth:`store_masks` evaluates and
    packs alike ones together), or the algorithm's own :meth:`compute_masks` where it
    overrides that."""
    own = type(self).compute_masks is not BaseUpdater.compute_masks
    compute = self.compute_masks if own else self.compute_lazy_masks
    return compute(params, sparsities, sparse_state, grads, old_masks, **kwargs)

  def leaf_mask(self, scores: Any, sparsity, axis: int | None = None) -> jax.Array:
    """Exact keep-mask of one leaf at ``sparsity`` with the sparsity type; with a layer
    ``axis``, every layer (slice) of a stacked leaf is at ``sparsity`` on its own."""
    if axis is None:
      return self.sparsity_type.mask(scores, sparsity)
    return selection.map_layers(lambda x: self.sparsity_type.mask(x, sparsity), axis, scores)

  def magnitude_masks(self, masks: PyTree, weights: PyTree, sparsity, axes: PyTree) -> PyTree:
    """:meth:`leaf_mask` of ``|w|`` at one ``sparsity`` for every pruned leaf of ``weights``
    (where ``masks`` is not None; ``axes``: each leaf's layer axis or None), found by one
    selection for all of them: a tree like ``masks``, None at the leaves not pruned. (A
    :meth:`leaf_mask` per leaf compiles a selection per leaf.)"""
    return apply_to_pruned(
      lambda ws, axs: self.sparsity_type.masks(
        [selection.Lazy(jnp.abs, w) for w in ws], [sparsity] * len(ws), axs
      ),
      masks,
      weights,
      axes,
    )

  def masks_from_scores(self, scores: PyTree, sparsities: PyTree, lazy: bool = False) -> PyTree:
    """Exact keep-masks from scores by the algorithm's ``selection_strategy``: per leaf (per
    layer of stacked leaves) with the sparsity type, or with one global threshold. With
    ``lazy``, masks may be :class:`prunax.selection.Lazy` (unstructured threshold masks)."""
    strategy = self.selection_strategy
    if lazy and _checks.accepts_keyword(strategy.masks, 'lazy'):
      return strategy.masks(self, scores, sparsities, lazy=True)
    return strategy.masks(self, scores, sparsities)  # a strategy without lazy masks

  def selects_top_k_per_leaf(self) -> bool:
    """Whether every pruned leaf (every layer of a stacked leaf) keeps its own top ``k``
    of scores: unstructured masks of their own (:func:`sparsity_types.is_plain_unstructured`)
    chosen per leaf, not by one global threshold."""
    return sparsity_types.is_plain_unstructured(self.sparsity_type) and isinstance(
      self.selection_strategy, strategies.PerLeaf
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
    _check_like_params(sparsities, params, dist)
    for (name, s), (_, leaf) in zip(
      sparsity_distributions.named_leaves(sparsities, is_leaf=is_none),
      sparsity_distributions.named_leaves(params),
      strict=True,
    ):
      if s is None:
        continue
      sparsity_distributions.check_sparsity(s, name)
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
          f'Parameter {name!r} has dtype {dtype}; only floating-point parameters '
          "can be pruned. Exclude it with the distribution's filter_fn."
        )
      self.sparsity_type.validate(layers.slice_shape(np.shape(leaf), axes.get(name)), name)
      self.sparsity_type.check_sparsity(s, f'parameter {name!r}')
    return sparsities

  def warn_undeclared_stacks(self, params: PyTree, targets: PyTree) -> None:
    """Warns about pruned leaves that look stacked (scanned) but have no layer axis."""
    axes = self.layer_axes_of(params)
    for (name, s), (_, leaf) in zip(
      sparsity_distributions.named_leaves(targets, is_leaf=is_none),
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

  def sparsities_at(self, targets: PyTree, step) -> PyTree:
    """Per-leaf sparsities of the schedule at ``step`` for the final ``targets``.

    Leaves with the same target (a Python number) share one computation, so a model of
    many leaves traces (and compiles) the schedule once per distinct target.
    """
    shared: dict = {}

    def at(s):
      if s is None:
        return None
      try:
        key = (type(s), s)
        hash(key)
      except TypeError:  # a traced or array target: computed on its own
        return self.scheduler.sparsity(step, s)
      if key not in shared:
        shared[key] = self.scheduler.sparsity(step, s)
      return shared[key]

    return jax.tree.map(at, targets, is_leaf=is_none)

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

  def store_masks(self, masks: PyTree, like: PyTree = None, params: PyTree = None) -> PyTree:
    """Boolean masks (arrays or :class:`prunax.selection.Lazy`) in their stored form:
    packed or uint8 per leaf (:meth:`packs`), or in the layout of the stored masks
    ``like`` (a state keeps the layout it started with); alike lazy masks are packed
    together (:func:`prunax.masks.pack_masks`). With ``params``, each stored mask is
    tied to its param's sharding (:func:`prunax.masks.shard_like_param`), for masks
    that nothing else ties to it: XLA's propagation may split them over fewer mesh
    axes (a stacked leaf's, found inside the layers' vmap) or not at all (masks that
    do not depend on the weights, from a jitted init)."""

    def packed(path, m, *old):
      if m is None:
        return None
      shape = m.shape if isinstance(m, selection.Lazy) else jnp.shape(m)
      return old[0].shape != shape if old else self.packs(sparsity_distributions.path_name(path))

    trees = (masks,) if like is None else (masks, like)
    how = jax.tree_util.tree_map_with_path(packed, *trees, is_leaf=is_none)
    flat, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    flat_how = treedef.flatten_up_to(how)
    out = [None] * len(flat)
    # Alike lazy masks are evaluated (and packed) together (masks_lib.pack_masks).
    for form, store in ((True, masks_lib.pack_masks), (False, _as_uint8)):
      chosen = [i for i, p in enumerate(flat_how) if p is not None and bool(p) == form]
      for i, m in zip(chosen, store([flat[i] for i in chosen]), strict=True):
        out[i] = m
    if params is not None:
      flat_params = treedef.flatten_up_to(params)
      out = [
        m if m is None else masks_lib.shard_like_param(m, p)
        for m, p in zip(out, flat_params, strict=True)
      ]
    return treedef.unflatten(out)

  def rng_key(self, sparse_state: SparseState | None, salt: int = 0) -> jax.Array:
    """The step's PRNG key (threefry): the state's key folded with its step count, then
    ``salt``; without a state, :meth:`initial_key` folded with ``salt``. Folded by
    :func:`prunax.selection.fold_key` (a hash), not ``jax.random.fold_in``, whose
    threefry rounds compile as a loop of kernels in every mask-update step."""
    if sparse_state is None:
      data = selection.fold_key(self.initial_key(), salt)
    else:
      data = selection.fold_key(sparse_state.rng, sparse_state.count, salt)
    return jax.random.wrap_key_data(data, impl='threefry2x32')

  def random_scores(self, params: PyTree, key: jax.Array) -> PyTree:
    """Lazy uniform scores per leaf (a hash of position and a per-leaf key, see
    :func:`prunax.selection.hash_uniform`), recomputed in every selection pass. The
    per-leaf keys are ``key`` folded with the leaf's index (:func:`prunax.selection.fold_key`)."""
    return self._hashed(params, key, selection.hash_uniform_at, selection.hash_uniform_layers_at)

  def random_keys(self, params: PyTree, key: jax.Array) -> PyTree:
    """Lazy random uint32 selection keys per leaf, pairwise distinct within a leaf (or a
    layer of a stacked leaf): :func:`prunax.selection.hash_keys`, keyed as
    :meth:`random_scores`. A top-k of them never ties (see
    :func:`prunax.selection.distinct_keys`)."""
    return self._hashed(params, key, selection.hash_keys_at, selection.hash_keys_layers_at)

  def _hashed(self, params: PyTree, key: jax.Array, at: Callable, layers_at: Callable) -> PyTree:
    """``Lazy(at, leaf, keys, i)`` per leaf (``layers_at`` with the layer ids for stacked
    leaves: a stream per layer), ``keys`` the leaves' keys, ``key`` folded with each index."""
    flat, treedef = jax.tree.flatten(params)
    flat_axes = treedef.flatten_up_to(self.layer_axes_tree(params))
    # One shared array of keys, each leaf reading its row (see selection.Shared).
    keys = selection.Shared(selection.fold_key(key, jnp.arange(len(flat), dtype=jnp.uint32)))

    def scores(x, i, axis):
      if axis is None:
        return selection.Lazy(at, x, keys, np.int32(i))
      # Stacked leaves: a stream per layer (the ids are sliced with the layer).
      shape = [1] * jnp.ndim(x)
      shape[axis] = jnp.shape(x)[axis]
      ids = jnp.arange(shape[axis], dtype=jnp.uint32).reshape(shape)
      return selection.Lazy(layers_at, x, keys, np.int32(i), ids)

    return treedef.unflatten(
      [scores(x, i, a) for i, (x, a) in enumerate(zip(flat, flat_axes, strict=True))]
    )

  # --------------------------------------------------------------------------- init

  def init_masks(self, params: PyTree, targets: PyTree) -> PyTree:
    """Boolean masks at ``init``: all ones (a dense start). Sparse training from a random
    mask overrides this with :meth:`random_masks`."""
    return jax.tree.map(
      lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
      targets,
      params,
      is_leaf=is_none,
    )

  def random_masks(self, params: PyTree, targets: PyTree) -> PyTree:
    """Random boolean masks at the ``targets`` (from :meth:`initial_key`), exact counts.

    Unstructured per-leaf masks keep the positions that a keyed permutation sends below
    the count (:mod:`prunax.random_masks`: elementwise, no selection to compile); other
    structures and strategies keep the top of random scores (:meth:`random_scores`)."""
    key = self.rng_key(None, salt=1)
    flat_t, treedef = jax.tree.flatten(targets, is_leaf=is_none)
    shapes = [tuple(np.shape(p)) for p in treedef.flatten_up_to(params)]
    axes = treedef.flatten_up_to(self.layer_axes_tree(params))
    sizes = [int(np.prod(layers.slice_shape(sh, a))) for sh, a in zip(shapes, axes, strict=True)]
    permuted = self.selects_top_k_per_leaf() and all(
      n <= random_masks_lib.MAX_POSITIONS for s, n in zip(flat_t, sizes) if s is not None
    )
    if not permuted:
      return self.masks_from_scores(self.random_scores(params, key), targets)
    ks = [
      None if s is None else n - sparsity_types.num_zeros(s, n)
      for s, n in zip(flat_t, sizes, strict=True)
    ]
    return treedef.unflatten(random_masks_lib.leaf_masks(shapes, ks, key, axes))

  def init_state(self, params: PyTree, inner_state: Any = None) -> SparseState:
    """The :class:`SparseState` for ``params`` around ``inner_state``."""
    targets = self.target_sparsities(params)
    self.warn_undeclared_stacks(params, targets)
    masks = self.init_masks(params, targets)
    # Masks that do not depend on the weights (all ones, random) would come out of a jitted
    # init replicated: each stored mask is tied to its param, so it is sharded like it.
    stored = self.store_masks(masks, params=params)
    return SparseState(
      inner_state=inner_state,
      masks=to_stored(stored),
      count=jnp.zeros([], jnp.int32),
      rng=self.initial_key(),
      algorithm_state=self.init_algorithm_state(params, masks, targets),
    )

  def init_algorithm_state(self, params: PyTree, masks: PyTree, targets: PyTree) -> Any:
    """The algorithm's own state at ``init`` (``SparseState.algorithm_state``).

    ``optax.MaskedNode()`` (none) by default. An algorithm with state returns a
    ``NamedTuple`` of its own (arrays only: ``optax.MaskedNode()`` at leaves that are
    not pruned, see :func:`prunax.tree_util.to_stored`), listing in a ``params_like``
    class attribute its fields that are trees like the params (hosts shard those like
    the params).

    Args:
      params: the params.
      masks: the boolean masks at ``init`` (None: leaf not pruned).
      targets: the per-leaf target sparsities.
    """
    del params, masks, targets
    return optax.MaskedNode()

  def init_with_optimizer(
    self, algorithm_state: Any, inner: optax.GradientTransformation, params: PyTree
  ) -> Any:
    """``algorithm_state`` completed with what needs the wrapped transformation ``inner``
    (e.g. its state for learned thresholds), outside the compiled init; unchanged by
    default."""
    del inner, params
    return algorithm_state

  def update_algorithm_state(self, algorithm_state: Any, grads: PyTree, masks: PyTree) -> Any:
    """The algorithm's state after a step with raw gradients ``grads`` (masked training;
    before any mask update of the step, which reads the new value); unchanged by
    default."""
    del grads, masks
    return algorithm_state

  # ------------------------------------------------------------------------- update

  def wrap_optax(
    self, inner: optax.GradientTransformation
  ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that applying its updates keeps the params sparse: the
    algorithm's ``engine`` around ``inner``.

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
    tx = self.engine(self, inner)
    if self.skip_gradients:
      tx = tx._replace(update=updater_args.skip_on_mask_updates(self, tx.update))
    return tx._replace(update=compiled_outside_trace(tx.update))

  # ---------------------------------------------------------------- explicit hooks

  def pre_forward_update(self, params: PyTree, opt_state: PyTree) -> PyTree:
    """Params the forward pass should use: ``params`` under the current masks.

    Not needed with ``wrap_optax`` + ``optax.apply_updates`` (the params are already
    sparse); kept for hand-written loops, where it is idempotent.
    """
    return map_masked(
      lambda m, p: jnp.where(m, p, 0).astype(p.dtype), bool_masks(opt_state, params), params
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

    The masks are computed by one compiled computation (``jit``, the updater static)
    where the updater is hashable and every input leaf is an array: run eagerly, each of
    the selection's operations would be dispatched, and compiled, on its own (a 3 x 5 x
    7 magnitude pruning took 1.7 s the first time and 0.4 s after, against 0.35 s and
    0.2 ms). Otherwise, or where an algorithm's masks need concrete values, eagerly.
    """
    masks = engines.compiled_call(_instant_masks, self, (params, grads, kwargs))
    sparse = map_masked(lambda m, p: jnp.where(m, p, 0).astype(p.dtype), masks, params)
    return sparse, masks


def static_jittable(updater: Any, *trees: Any) -> bool:
  """Whether ``updater`` can be a static ``jit`` argument and ``trees`` hold only arrays."""
  try:
    hash(updater)
  except TypeError:
    return False
  leaves = jax.tree.leaves(trees)
  return all(isinstance(x, jax.Array | np.ndarray) for x in leaves)


def _instant_masks(updater: Any, params: PyTree, grads: PyTree, kwargs: dict, static=()) -> PyTree:
  """The keep-masks of :meth:`BaseUpdater.instant_sparsify` (run by
  ``engines.compiled_call``: jitted where it can be, else eagerly)."""
  del static
  targets = updater.target_sparsities(params)
  return updater.compute_masks(
    params, targets, grads=grads, old_masks=updater.init_masks(params, targets), **kwargs
  )


def _as_uint8(masks: list) -> list:
  """Bool masks (arrays or alike lazy ones evaluated together) as uint8 arrays."""
  return selection.map_alike(lambda m: m.astype(jnp.uint8), masks)


def _check_like_params(sparsities: PyTree, params: PyTree, dist: Any) -> None:
  """Raises ValueError, naming the leaves, if a distribution's tree of sparsities does not
  have a leaf (a sparsity or None) for every leaf of ``params``, and no other."""
  want = [name for name, _ in sparsity_distributions.named_leaves(params)]
  got = [name for name, _ in sparsity_distributions.named_leaves(sparsities, is_leaf=is_none)]
  if got != want:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    problems = [f'it has none for {missing}'] if missing else []
    problems += [f'it has entries {extra} that are no parameter'] if extra else []
    raise ValueError(
      f'The sparsity distribution {dist!r} must return a tree like the params, with a '
      'sparsity (or None: not pruned) for every parameter; '
      + ('; '.join(problems) or f'its leaves are {got}, in another order or structure')
      + f' (parameters: {want}).'
    )


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


def __getattr__(name: str):
  # jaxpruner defines NoPruning next to BaseUpdater (`jaxpruner.base_updater.NoPruning`);
  # prunax's lives with the algorithms, which import this module.
  if name == 'NoPruning':
    from prunax.algorithms import NoPruning

    return NoPruning
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""The two engines: masked training and straight-through training.

``updater.wrap_optax(inner)`` is ``updater.engine(updater, inner)``: an optax-style
``init_fn``/``update_fn`` pair built around the algorithm's hooks. For a step with gradients
``g`` at params ``p`` (the params the model saw):

:func:`masked_training` (pruning, drop-and-grow):

1. The inner optimizer runs on the masked gradients ``g * m``, giving ``u``. Its per-weight
   state (moments) of inactive weights is held at the inner optimizer's initial value: it
   is reset under ``m`` as the optimizer reads it, so a weight that becomes active again
   starts with fresh moments.
2. On a mask-update step of the schedule, new masks ``m'`` are computed from the weights
   the model saw, ``p`` (zero outside ``m`` after any wrapped step; a weight that is not
   is removed by step 3 anyway), and the raw gradients ``g``. This runs inside a
   ``lax.cond`` that reads only the step's inputs, so steps without an update stay one
   fused elementwise pass over the params (the optimizer's own), plus a read of the masks.
3. The returned updates are ``where(m' & m, u, -p)``, so ``p + update`` is ``p + u`` where a
   weight stays and exactly 0 elsewhere (new connections of SET/RigL start at zero).

:func:`straight_through` (STE, SR-STE, Top-KAST, AutoSparse): the algorithm's state holds
dense weights ``d`` of the pruned leaves; the optimizer runs on them with the gradients
taken at the sparse weights (transformed by the algorithm), every weight trains (its
moments are never reset), ``m'`` is recomputed from ``d + u`` at every step, and the
updates are ``forward(d + u, m') - p``; ``d + u`` is stored.

Scores are :class:`prunax.selection.Lazy` where they are elementwise functions of
buffers (``|w|``, ``|w * g|``, hashed random scores), so the selection recomputes them in
each pass and a mask update adds no full-size score array to memory. All state lives in
:class:`prunax.SparseState`, so hosts checkpoint, replicate and shard it like any
optimizer state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import masks as masks_lib
from prunax import selection
from prunax.state import SparseState
from prunax.tree_util import from_stored
from prunax.tree_util import is_none
from prunax.tree_util import map_masked
from prunax.tree_util import named_leaves
from prunax.tree_util import path_name
from prunax.tree_util import pruned_only
from prunax.tree_util import to_stored

PyTree = Any


def masked_training(updater: Any, inner: optax.GradientTransformation):
  """The engine of pruning and drop-and-grow algorithms (see the module docstring).

  Args:
    updater: the algorithm (a :class:`prunax.BaseUpdater`).
    inner: the wrapped transformation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparseState`.
  """
  inner = optax.with_extra_args_support(inner)
  init_fn = functools.partial(_init, updater, inner)

  def update_fn(grads, state, params=None, **extra):
    state, masks, targets = _begin(updater, state, params)
    # The inner optimizer's per-weight state (moments) of inactive weights is held at its
    # initial value, so a weight grown by a mask update starts afresh. Resetting the input
    # state under the stored masks fuses into the optimizer's own pass.
    inner_state = _reset_inactive(inner, state.inner_state, masks, params)
    state = state._replace(
      algorithm_state=updater.update_algorithm_state(state.algorithm_state, grads, masks)
    )
    masked_grads = map_masked(lambda m, g: _select(m, g, 0), masks, grads)
    updates, inner_state = inner.update(masked_grads, inner_state, params, **extra)
    sparsities = updater.sparsities_at(targets, state.count)
    is_update = updater.scheduler.is_update_step(state.count)

    def fresh_masks(_):
      # Scores come from the step's inputs only (the params the model saw, zero outside
      # the masks after any wrapped step, and their gradients): a computed operand would
      # be materialised for the cond, and a buffer the optimizer updates in place (its
      # moments) would be copied.
      old = masks_lib.lazy_masks(state.masks, params)
      new = updater.new_masks(
        params, sparsities, sparse_state=state, grads=grads, old_masks=old, **extra
      )
      return updater.store_masks(new, like=state.masks)

    # Steps without a mask update keep the stored (possibly packed) masks as they are.
    if isinstance(is_update, (bool, np.bool_)) and not is_update:
      stored = state.masks  # A schedule that never updates: nothing to trace or compile.
    else:
      stored = jax.lax.cond(is_update, fresh_masks, lambda _: state.masks, None)
    new_masks = masks_lib.unpack_masks(stored, params)
    out = map_masked(
      lambda m, u, m_new, p: _select(m & m_new, u, -p), masks, updates, new_masks, params
    )
    if updater.skip_gradient_on_mask_update:
      out = _skip_gradient_step(out, params, masks, new_masks, is_update)
    return out, _stored(
      state._replace(inner_state=inner_state, masks=stored, count=state.count + 1)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def straight_through(updater: Any, inner: optax.GradientTransformation):
  """The engine of straight-through algorithms (see the module docstring).

  The algorithm's state (``updater.init_algorithm_state``) must have a ``dense_params``
  field: the dense weights of the pruned leaves (``MaskedNode()`` elsewhere). The
  algorithm's hooks: ``before_update`` (its own state after the step's gradients, e.g.
  learned thresholds), ``transform_gradients`` (the gradients fed to the optimizer of
  the dense weights), ``compute_masks``, ``after_masks`` (its state once the masks are
  chosen) and ``forward_params``.

  Args:
    updater: the algorithm (a :class:`prunax.BaseUpdater` with the straight-through hooks,
      see :class:`prunax.algorithms.ste.StraightThrough`).
    inner: the wrapped transformation.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparseState`.
  """
  inner = optax.with_extra_args_support(inner)
  init_fn = functools.partial(_init, updater, inner)

  def update_fn(grads, state, params=None, **extra):
    state, masks, targets = _begin(updater, state, params, dense_of=_dense_weights)
    old = state
    # The dense weights the forward pass of this step was computed from.
    dense = jax.tree.map(
      lambda d, p: p if d is None else d, _dense_weights(state), params, is_leaf=is_none
    )
    algorithm_state, grads = updater.before_update(
      state.algorithm_state, grads, dense, masks, state, inner
    )
    state = state._replace(algorithm_state=algorithm_state)
    fed = updater.transform_gradients(grads, dense, masks, old)
    updates, inner_state = inner.update(fed, state.inner_state, dense, **extra)
    candidate = optax.apply_updates(dense, updates)
    # The mask is recomputed from the dense weights at every step.
    sparsities = updater.sparsities_at(targets, state.count)
    new_masks = updater.new_masks(
      candidate, sparsities, sparse_state=state, grads=grads, old_masks=masks, **extra
    )
    algorithm_state = updater.after_masks(algorithm_state, new_masks, sparsities)
    # Alike masks are evaluated and packed together for the state; the forward pass reads
    # each mask evaluated on its own (an elementwise comparison, fused into it). Not by
    # selection.materialize_all: inside its shared jitted function the alike leaves'
    # kernels came out different, one compiled per leaf (test_compile_cost).
    # Tied to their params' sharding: found anew at every step, with no old mask to tie
    # them (masked training's cond does), a stacked leaf's came out split over one mesh
    # axis fewer than its param.
    stored = updater.store_masks(new_masks, like=state.masks, params=params)
    new_masks = jax.tree.map(selection.materialize, new_masks, is_leaf=is_none)
    forward = updater.forward_params(candidate, new_masks, state)
    out = map_masked(lambda m, u, f, p: f - p, new_masks, updates, forward, params)
    algorithm_state = algorithm_state._replace(
      dense_params=to_stored(pruned_only(new_masks, candidate))
    )
    return out, _stored(
      state._replace(
        inner_state=inner_state,
        masks=stored,
        count=state.count + 1,
        algorithm_state=algorithm_state,
      )
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def updater_of(tx: Any) -> Any:
  """The algorithm of a transformation built by ``updater.wrap_optax`` (else None).

  Examples:
    >>> import optax, prunax
    >>> pruner = prunax.MagnitudePruning(sparsity=0.5)
    >>> updater_of(pruner.wrap_optax(optax.sgd(0.1))) is pruner
    True
    >>> updater_of(optax.sgd(0.1)) is None
    True
  """
  init = getattr(tx, 'init', None)
  if isinstance(init, functools.partial) and init.func is _init:
    return init.args[0]
  return None


def trains_dense_weights(updater: Any) -> bool:
  """Whether ``updater`` (an algorithm or its class) trains dense weights kept in its state
  (the straight-through engine), so its optimizer sees dense gradients."""
  return getattr(updater, 'engine', None) is straight_through


def _stored(state: SparseState) -> SparseState:
  return state._replace(masks=to_stored(state.masks))


def _dense_weights(state: SparseState) -> PyTree:
  """The dense weights a straight-through algorithm keeps (None at unpruned leaves)."""
  return from_stored(state.algorithm_state.dense_params)


def _begin(updater: Any, state: SparseState, params: PyTree, dense_of=None):
  """Checks the inputs of an update: ``(state with None masks, bool masks, targets)``;
  ``dense_of(state)`` gives the dense weights whose shapes are checked too, if any."""
  if params is None:
    raise ValueError(
      'A prunax-wrapped transformation needs params: call tx.update(grads, opt_state, params).'
    )
  if not isinstance(state, SparseState):
    raise TypeError(
      f'Expected a prunax SparseState, got {type(state).__name__}; initialise '
      "the state with the wrapped transformation's init."
    )
  state = state._replace(masks=from_stored(state.masks))
  _check_params_unchanged(state, params, None if dense_of is None else dense_of(state))
  targets = updater.target_sparsities(params)
  updater.warn_undeclared_stacks(params, targets)
  return state, masks_lib.unpack_masks(state.masks, params), targets


def _init(updater: Any, inner, params):
  inner_state = inner.init(params)
  if _is_placeholder(params):
    # For tree_map_params: the inner state's params-like parts are mapped; masks and the
    # algorithm's state (trees of the pruned params only) count as non-params.
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
    state = _jitted_init_state(static_updater(updater), params, inner_state)
  return state._replace(
    algorithm_state=updater.init_with_optimizer(state.algorithm_state, inner, params)
  )


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init_state(updater: Any, params, inner_state) -> SparseState:
  return _unwrapped(updater).init_state(params, inner_state)


class StaticUpdater:
  """A copy of an updater as a static ``jit`` argument, hashed and compared by the
  updater's type and attribute values (see :func:`static_updater`).

  Attributes:
    updater: the copy.
    key: the type and the attribute values, arrays as their bytes.
  """

  __slots__ = ('updater', 'key')

  def __init__(self, updater: Any, key: Any):
    self.updater = updater
    self.key = key

  def __hash__(self) -> int:
    return hash(self.key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, StaticUpdater) and self.key == other.key


def _unwrapped(updater: Any) -> Any:
  """The updater a :func:`static_updater` stands for."""
  return updater.updater if isinstance(updater, StaticUpdater) else updater


def static_updater(updater: Any) -> Any:
  """``updater`` as a static ``jit`` argument: a copy, since jit keeps its static
  arguments and a jaxpruner-style updater can be changed in place after the call (a
  changed one must not find the trace). Where its attribute values can be keyed, a
  :class:`StaticUpdater`, so that equal updaters share one trace: a jaxpruner-style
  updater hashes by identity, and each copy of it traced and compiled again (``prunax.
  compat.jaxpruner``'s ``instant_sparsify``: 0.8-1 s at every call). Otherwise the copy,
  hashed as the updater hashes itself."""
  try:
    key = (type(updater), _frozen(vars(updater)))
    hash(key)
  except TypeError:
    return copy.copy(updater)
  return StaticUpdater(copy.copy(updater), key)


def _frozen(value: Any) -> Any:
  """A hashable stand-in for ``value``, equal for equal values of the same types (a
  concrete array as its dtype, shape and bytes); TypeError where there is none."""
  if isinstance(value, dict):
    items = sorted(value.items(), key=lambda kv: repr(kv[0]))
    return ('dict', tuple((_frozen(k), _frozen(v)) for k, v in items))
  if isinstance(value, list | tuple) and not hasattr(value, '_fields'):
    return (type(value), tuple(_frozen(v) for v in value))
  if isinstance(value, jax.Array) and (
    isinstance(value, jax.core.Tracer) or not value.is_fully_addressable
  ):
    raise TypeError('a traced array, or one spread over processes, is not keyed')
  if isinstance(value, np.ndarray | jax.Array):
    a = np.asarray(value)
    return ('array', str(a.dtype), a.shape, a.tobytes())
  hash(value)
  return (type(value), value)


def compiled_outside_trace(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """``update_fn`` (a wrapped transformation's update), run by one jitted function of its
  own when it is called outside any trace on arrays placed on one set of devices.

  Run eagerly, the update dispatched its operations one by one, and its selection
  loops (``while_loop`` and ``cond`` bound outside a trace, their bodies new closures at
  every call) compiled again at every call: 1.5-1.8 s a step of a small MLP's RigL.
  Inside a caller's trace (``jit``, ``vmap``, a host's compiled step), with inputs that
  are not all arrays, or for an algorithm that reads concrete values (which cannot be
  traced; found once, then run eagerly), it is ``update_fn`` itself.
  """
  jitted = jax.jit(update_fn)
  traceable = [True]

  @functools.wraps(update_fn)
  def update(grads, state, params=None, **extra):
    leaves = jax.tree.leaves((grads, state, params, extra))
    if traceable[0] and _compilable(leaves):
      try:
        return jitted(grads, state, params, **extra)
      except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        traceable[0] = False
    return update_fn(grads, state, params, **extra)

  return update


def compiled_call(fn: Callable[..., Any], updater: Any, args: tuple, static: Any = ()) -> Any:
  """``fn(updater, *args, static)``, run by one jitted function when called outside any
  trace with array ``args`` on one set of devices: keyed by ``fn``, the updater's
  :func:`static_updater` and ``static`` (hashable), so a repeated call compiles nothing.
  Run eagerly, a selection's loops (bound outside a trace, their bodies new closures at
  every call) compiled again at every call. Eagerly where it cannot be jitted (inside a
  trace, other inputs, an unhashable ``static``, an algorithm that reads concrete
  values)."""
  if _compilable(jax.tree.leaves(args)):
    try:
      hash(static)
      key = static_updater(updater)
      hash(key)
      return _compiled_call(fn, key, static, args)
    except (
      TypeError,
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerArrayConversionError,
    ):
      pass
  return fn(updater, *args, static)


def _compilable(leaves: list) -> bool:
  """Whether inputs with these leaves can go to a jitted function of their own: arrays,
  none traced, placed on one set of devices."""
  return all(
    isinstance(x, jax.Array | np.ndarray) for x in leaves
  ) and selection.untraced_on_one_device_set(leaves)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled_call(fn, updater, static, args):
  return fn(_unwrapped(updater), *args, static)


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
    is_leaf=is_none,
  )
  return jax.tree.map(lambda s, o: jnp.where(is_update, s, o), skipped, out)


class _NotParams:
  """Marks the parts of an optimizer state that are not like the params."""


def _select(keep: jax.Array, x: jax.Array, other) -> jax.Array:
  """``jnp.where(keep, x, other)`` for ``x`` and ``other`` (an array of ``x``'s shape or a
  scalar), traced as one ``lax.select``: the engine selects several times per pruned leaf
  in every step, and ``jnp.where``'s own traced function costs trace and compile time."""
  dtype = jnp.result_type(x, other)
  x = x if x.dtype == dtype else x.astype(dtype)
  if jnp.ndim(other) == 0:
    other = jax.lax.full_like(x, other)
  elif other.dtype != dtype:
    other = other.astype(dtype)
  return jax.lax.select(keep, x, other)


def _reset_inactive(inner, inner_state, masks, params):
  """``inner_state`` with the per-weight state of inactive weights at its initial value.

  The per-weight leaves (those of the params' shape inside the params-like subtrees that
  ``optax.tree_utils.tree_map_params`` finds) take, where ``masks`` are False, the value
  the inner optimizer's own ``init`` gives them (zero for moments, the optimizer's own
  start for others, e.g. cocob), so a weight grown by a mask update starts afresh.
  Leaves of other shapes (factored moments, counters, scalars) and ``MaskedNode``
  entries (``optax.masked``, ``multi_transform``) are left alone.
  """
  keep = jax.tree.map(lambda m: True if m is None else m, masks, is_leaf=is_none)
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
    return _select(k, v, v0.astype(v.dtype))

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


def _check_params_unchanged(state: SparseState, params: PyTree, dense: PyTree = None) -> None:
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
  dense = [None] * len(flat) if dense is None else treedef.flatten_up_to(dense)
  for (path, p), m, d in zip(flat, masks, dense, strict=True):
    if m is None:
      continue
    name = path_name(path)
    shape, dtype = tuple(np.shape(p)), jnp.result_type(p)
    if d is not None and (tuple(np.shape(d)), jnp.result_type(d)) != (shape, dtype):
      raise ValueError(
        f'Parameter {name!r} is {dtype}{list(shape)} at update, but the optimizer '
        f'state was initialised for {jnp.result_type(d)}{list(np.shape(d))}; '
        'initialise the state again (tx.init) after changing the model.'
      )
    stored, packed = tuple(np.shape(m)), masks_lib.packed_shape(shape) if shape else shape
    if stored not in (shape, packed):
      raise ValueError(
        f'Parameter {name!r} has shape {shape} at update, but its mask in the '
        f'optimizer state has shape {stored}, made for another shape (a param '
        f'of shape {shape} has a mask of shape {shape}, or {packed} packed); '
        'initialise the state again (tx.init) after changing the model.'
      )


def _unpack_unaligned(updater: Any, params: PyTree) -> Any:
  """``updater`` storing unpacked the masks of placed params whose sharding splits the
  last axis where a packed mask cannot follow (:func:`packing_aligned`)."""
  unaligned = [
    name
    for name, p in named_leaves(params)
    if isinstance(p, jax.Array)
    and not isinstance(p, jax.core.Tracer)
    and np.ndim(p) > 0
    and updater.packs(name)
    and not masks_lib.packing_aligned(np.shape(p)[-1], masks_lib.last_axis_shards(p))
  ]
  if not unaligned:
    return updater
  spec = updater.packed_masks
  spec = dict(spec) if isinstance(spec, tuple) else ({} if spec else {'.*': False})
  spec.update({re.escape(name): False for name in unaligned})
  return dataclasses.replace(updater, packed_masks=spec)

"""jaxpruner's constructor arguments and methods on every prunax updater.

:class:`JaxprunerArgs` is a base of :class:`prunax.BaseUpdater`. Its fields are keyword-only,
so prunax's positional order is unchanged; ``resolve`` (run first in ``__post_init__``)
turns them into prunax's own fields, and the methods are jaxpruner's names for prunax's
operations. This module imports the engine lazily (the engine imports it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import engines
from prunax import selection
from prunax import sparsity_distributions as dists
from prunax import sparsity_types
from prunax import tree_util
from prunax.tree_util import is_none

PyTree = Any
MASK_DTYPE = jnp.uint8


def all_dense(params: PyTree) -> PyTree:
  """The distribution of ``sparsity_distribution_fn=None``: no leaf is pruned."""
  return jax.tree.map(lambda _: None, params)


@dataclasses.dataclass(frozen=True)
class TopK:
  """jaxpruner's ``topk_fn(scores, sparsity) -> uint8 mask`` for a prunax sparsity type."""

  sparsity_type: Any

  def __call__(self, scores, sparsity) -> jax.Array:
    return self.sparsity_type.mask(jnp.asarray(scores), sparsity).astype(MASK_DTYPE)


@dataclasses.dataclass(frozen=True)
class CustomTopK(sparsity_types.SparsityType):
  """A sparsity type whose masks come from a user's ``topk_fn(scores, sparsity)``."""

  fn: Callable[[jax.Array, Any], jax.Array]

  def mask(self, scores, sparsity):
    return jnp.asarray(self.fn(selection.materialize(scores), sparsity)).astype(bool)


def _key_data(seed) -> tuple[int, ...]:
  if jnp.issubdtype(jnp.result_type(seed), jax.dtypes.prng_key):
    seed = jax.random.key_data(seed)
  data = np.asarray(seed)
  if data.dtype.kind not in 'ui' or data.ndim != 1:
    raise ValueError(f'rng_seed must be an int or a PRNG key (jax.random.PRNGKey), got {seed!r}.')
  return tuple(int(x) for x in data)


def _with_map_and_filter(dist, filter_fn, custom_map):
  """``dist`` with jaxpruner's ``filter_fn`` / ``custom_sparsity_map`` constructor fields."""
  extra = {
    k: v
    for k, v in (('filter_fn', filter_fn), ('custom_sparsity_map', custom_map))
    if v is not None
  }
  # Bound by prunax's Partial (of any distribution taking them, as Partial checks) or by
  # functools.partial (jaxpruner's form) of uniform or erk.
  fn, bound = dists.unwrapped(dists.resolve(dist))
  if fn not in (dists.uniform, dists.erk) and not isinstance(dist, dists.Partial):
    raise ValueError(
      f'filter_fn and custom_sparsity_map apply to the "uniform" and "erk" '
      f'distributions, not to {dist!r}; give them to your distribution instead.'
    )
  twice = sorted(set(bound) & set(extra))
  if twice:
    raise ValueError(
      f'{twice} given to the updater and bound in its distribution {dist!r}; give each once.'
    )
  kwargs = {
    k: dict(v) if k == 'custom_sparsity_map' and not isinstance(v, Mapping) else v
    for k, v in bound.items()
  }
  return dists.Partial(fn, **kwargs, **extra)


@dataclasses.dataclass(frozen=True)
class JaxprunerArgs:
  """jaxpruner's updater arguments, accepted by every prunax updater (keyword-only).

  Attributes:
    rng_seed: a PRNG key (or int) for random scores and masks; replaces ``seed``. Stored
      as its key data (a tuple of ints), so the updater stays hashable.
    use_packed_masks: jaxpruner's name for ``packed_masks`` (wins when given).
    skip_gradients: on mask-update steps, update the masks only: the weights keep their
      values (under the new masks) and the inner optimizer's state is unchanged.
    is_sparse_gradients: whether the inner optimizer sees masked gradients. prunax
      always masks them (and the optimizer state) for non-STE algorithms and never for
      STE ones; None reads as that, and the other value is an error.
    topk_fn: ``fn(scores, sparsity) -> mask`` replacing the sparsity type's selection
      (it becomes a :class:`CustomTopK` sparsity type). By default a :class:`TopK` of
      ``sparsity_type``.
    filter_fn: ``fn(name, leaf) -> bool`` for the ``uniform``/``erk`` distribution
      (jaxpruner's global pruners take it here); folded into the distribution.
    custom_sparsity_map: ``{name or tuple path: sparsity}``, folded likewise.
  """

  rng_seed: Any = dataclasses.field(default=None, kw_only=True)
  use_packed_masks: bool | None = dataclasses.field(default=None, kw_only=True)
  skip_gradients: bool = dataclasses.field(default=False, kw_only=True)
  is_sparse_gradients: bool | None = dataclasses.field(default=None, kw_only=True)
  topk_fn: Any = dataclasses.field(default=None, kw_only=True)
  filter_fn: Any = dataclasses.field(default=None, kw_only=True)
  custom_sparsity_map: Any = dataclasses.field(default=None, kw_only=True)

  def resolve_jaxpruner_args(self) -> None:
    """Turns jaxpruner's arguments into prunax's fields (first step of __post_init__)."""
    set_ = functools.partial(object.__setattr__, self)
    name = type(self).__name__
    dist = self.sparsity_distribution_fn
    if dist is None:
      set_('sparsity_distribution_fn', dists.ParamsOnly(all_dense))
      if self.sparsity is None:
        set_('sparsity', 0.0)
    elif (
      isinstance(dist, functools.partial)
      and getattr(dist.func, '__wrapped__', dist.func) in (dists.uniform, dists.erk)
      and not dist.args
      and 'sparsity' in dist.keywords
    ):
      # jaxpruner's form: partial(uniform, sparsity=s) -> sparsity=s, the plain distribution.
      target = dist.keywords['sparsity']
      if self.sparsity is not None and self.sparsity != target:
        raise ValueError(
          f'{name} got sparsity={self.sparsity} and a distribution bound to '
          f'sparsity={target}; give the target once.'
        )
      set_('sparsity', target)
      rest = {k: v for k, v in dist.keywords.items() if k != 'sparsity'}
      func = getattr(dist.func, '__wrapped__', dist.func)  # jaxpruner's erk wraps prunax's.
      set_('sparsity_distribution_fn', dists.Partial(func, **rest) if rest else func)
    elif (
      self.sparsity is None
      and callable(dist)
      and not isinstance(dist, (str, Mapping, dists.CustomMap, dists.Partial, dists.ParamsOnly))
      and dist not in (dists.uniform, dists.erk)
    ):
      # jaxpruner calls a distribution as fn(params); without a prunax target, so does prunax.
      set_('sparsity_distribution_fn', dists.ParamsOnly(dist))
    if self.filter_fn is not None or self.custom_sparsity_map is not None:
      set_(
        'sparsity_distribution_fn',
        _with_map_and_filter(
          self.sparsity_distribution_fn, self.filter_fn, self.custom_sparsity_map
        ),
      )
      set_('filter_fn', None)  # Folded: dataclasses.replace must not fold them twice.
      set_('custom_sparsity_map', None)
    if self.rng_seed is not None:
      if isinstance(self.rng_seed, int) and not isinstance(self.rng_seed, bool):
        set_('seed', self.rng_seed)
        set_('rng_seed', None)
      else:
        set_('rng_seed', _key_data(self.rng_seed))
    if self.use_packed_masks is not None:
      set_('packed_masks', bool(self.use_packed_masks))
    if not isinstance(self.skip_gradients, bool):
      raise ValueError(f'skip_gradients must be a bool, got {self.skip_gradients!r}.')
    if self.skip_gradients and engines.trains_dense_weights(self):
      raise ValueError(
        f'{name} keeps dense weights (STE) and has no mask-update steps to '
        'skip; skip_gradients=True is not supported for it.'
      )
    masked = not engines.trains_dense_weights(self)
    if self.is_sparse_gradients is None:
      set_('is_sparse_gradients', masked)
    elif bool(self.is_sparse_gradients) != masked:
      raise ValueError(
        f'{name} feeds the inner optimizer {"masked" if masked else "dense"} gradients; '
        f'is_sparse_gradients={self.is_sparse_gradients} cannot be honoured (see '
        'MIGRATION.md).'
      )
    stype = sparsity_types.from_string(self.sparsity_type)
    if self.topk_fn is None or isinstance(self.topk_fn, TopK):
      set_('topk_fn', TopK(stype))
    elif not isinstance(stype, CustomTopK) or stype.fn is not self.topk_fn:
      if not isinstance(stype, sparsity_types.Unstructured):
        raise ValueError(
          f'{name} got both topk_fn and sparsity_type={stype!r}; a custom '
          'topk_fn defines the structure, give one of them.'
        )
      set_('sparsity_type', CustomTopK(self.topk_fn))

  # --------------------------------------------------------------- jaxpruner's methods

  def initial_key(self) -> jax.Array:
    """The RNG key the state starts from: ``rng_seed`` if given, else ``PRNGKey(seed)``."""
    if self.rng_seed is not None:
      return jnp.asarray(self.rng_seed, jnp.uint32)
    return jax.random.PRNGKey(self.seed)

  def apply_masks(self, params: PyTree, masks: PyTree, is_packed: bool | None = False) -> PyTree:
    """``params`` times ``masks`` (None, or a state's MaskedNode: unchanged); packed masks are
    prunax's packing.

    ``is_packed=None`` tells each leaf's layout from its shape (a stored mask shaped like
    its param is unpacked), as masks stored by a wrapped transformation may mix both.
    """
    from prunax import base_updater

    def apply(m, p):
      if m is None:  # a leaf that is not pruned
        return p
      packed = is_packed if is_packed is not None else jnp.shape(m) != jnp.shape(p)
      return base_updater.apply_mask(p, m, packed)

    # The state's masks hold MaskedNode where a leaf is not pruned (its stored form).
    return jax.tree.map(apply, tree_util.from_stored(masks), params, is_leaf=is_none)

  def create_masks(self, scores: PyTree, sparsities: PyTree = None, target_sparsity=None) -> PyTree:
    """uint8 keep-masks of ``scores`` at per-leaf ``sparsities`` (None: dense leaf).

    A single number (``target_sparsity``, or a float ``sparsities``) is spread over the
    leaves by the updater's distribution.
    """
    if target_sparsity is not None:
      sparsities = target_sparsity
    if sparsities is None or isinstance(sparsities, (int, float)):
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), scores)
      dist = self.sparsity_distribution_fn
      sparsities = (
        dist(shapes)
        if isinstance(dist, dists.ParamsOnly) and sparsities is None
        else dists.resolve(dist)(shapes, sparsities if sparsities is not None else self.sparsity)
      )
    scores = jax.tree.map(jnp.asarray, scores)
    # Numbers become a static argument of the compiled call (traced ones: run eagerly).
    leaves, treedef = jax.tree.flatten(sparsities)
    static = (treedef, tuple(leaves))
    return engines.compiled_call(_create_masks, self, (scores,), static)

  def get_initial_masks(self, params: PyTree, target_sparsities: PyTree) -> PyTree:
    """uint8 masks ``wrap_optax``'s ``init`` starts from (None for dense leaves)."""
    if target_sparsities is None:
      return jax.tree.map(lambda _: None, params)
    masks = self.init_masks(params, target_sparsities)
    # Random initial masks are lazy (prunax.random_masks): alike ones drawn together.
    flat, treedef = jax.tree.flatten(masks)
    return treedef.unflatten(selection.map_alike(lambda m: m.astype(MASK_DTYPE), flat))

  def update_state(self, sparse_state, params: PyTree, grads: PyTree = None, **kwargs):
    """``sparse_state`` with masks recomputed at the schedule's sparsity for its step.

    What a wrapped ``update`` does on a mask-update step (``kwargs`` reach
    ``calculate_scores``); the optimizer's moments of weights that become inactive are
    zeroed by the next wrapped ``update``.
    """
    return engines.compiled_call(_update_state, self, (sparse_state, params, grads, kwargs))


def _create_masks(updater, scores: PyTree, static: tuple) -> PyTree:
  """:meth:`JaxprunerArgs.create_masks` once its sparsities are resolved (``static``:
  their tree's structure and leaves)."""
  treedef, leaves = static
  masks = updater.masks_from_scores(scores, jax.tree.unflatten(treedef, leaves))
  return jax.tree.map(lambda m: m.astype(MASK_DTYPE), masks)


def _update_state(updater, sparse_state, params: PyTree, grads: PyTree, kwargs: dict, static=()):
  """:meth:`JaxprunerArgs.update_state`."""
  del static
  from prunax import base_updater

  targets = updater.target_sparsities(params)
  sparsities = updater.sparsities_at(targets, sparse_state.count)
  old = base_updater.lazy_masks(sparse_state.masks, params)
  new = updater.new_masks(
    params, sparsities, sparse_state=sparse_state, grads=grads, old_masks=old, **kwargs
  )
  # The stored form (MaskedNode where a leaf is not pruned), as the state was: the same
  # tree, so that update_state can be a branch of a lax.cond as jaxpruner's loops use it.
  stored = updater.store_masks(new, like=sparse_state.masks)
  return sparse_state._replace(masks=tree_util.to_stored(stored))


def skip_on_mask_updates(updater, update: Callable[..., Any]) -> Callable[..., Any]:
  """``update`` that, on the schedule's mask-update steps, only updates the masks.

  The returned updates move each weight to ``where(new_mask, w, 0)`` and the inner state
  stays as it was (jaxpruner's ``skip_gradients``).
  """
  from prunax import base_updater

  def skipping_update(grads, state, params=None, **extra):
    out, new_state = update(grads, state, params, **extra)
    is_update = updater.scheduler.is_update_step(state.count)
    if isinstance(is_update, (bool, np.bool_)) and not is_update:
      return out, new_state
    masks = base_updater.unpack_masks(new_state.masks, params)
    held = jax.tree.map(
      lambda m, p: jnp.zeros_like(p) if m is None else jnp.where(m, 0, -p).astype(p.dtype),
      masks,
      params,
      is_leaf=is_none,
    )
    out = jax.tree.map(lambda h, u: jnp.where(is_update, h, u), held, out)
    inner = jax.tree.map(
      lambda old, new: jnp.where(is_update, old, new), state.inner_state, new_state.inner_state
    )
    return out, new_state._replace(inner_state=inner)

  return skipping_update

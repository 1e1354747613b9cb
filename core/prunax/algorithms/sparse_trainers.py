"""Sparse-to-sparse training: static random masks, SET and RigL.

Masks are drawn at random at ``init``, already at the target sparsity of the
distribution (ERK is the usual choice): exact counts, uniformly random positions
(unstructured: :mod:`prunax.random_masks`, a keyed permutation; structured: the top of
random scores). SET (Mocanu et al., 2018) and RigL (Evci et al.,
2020) update them every ``update_freq`` steps: among the ``n`` active weights of a leaf,
``floor(f * n)`` with the smallest magnitude are dropped (as in the RigL reference code;
``f`` is the drop fraction, cosine-decayed to 0 at ``update_end_step``), and as many
inactive ones are grown, chosen at random (SET) or by largest gradient magnitude (RigL,
whose mask-update steps make no gradient step, as in its reference code). Grown weights
start at zero and their optimizer moments are reset; the count of active weights never
changes. Dropped weights may be grown again in the same update (then they keep their
value). Ties are broken by the lowest flat index. SET's random grow scores are keys that
never tie (:func:`prunax.selection.hash_keys`), so its grow search compiles no tie-break.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp

from prunax import _checks
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.base_updater import BaseUpdater
from prunax.masks import lazy_mask
from prunax.masks import pack_masks
from prunax.tree_util import apply_to_pruned

_STRUCTURE_NAMES = {sparsity_types.Unstructured: 'unstructured', sparsity_types.NByM: 'N:M'}


def active_score(mask, score):
  """``score`` where ``mask`` keeps a weight, ``-inf`` elsewhere: scores for keeping among
  the active weights (a drop)."""
  return jnp.where(mask, score, -jnp.inf)


def inactive_score(kept, score):
  """``score`` where ``kept`` does not keep a weight, the lowest score elsewhere (``-inf``,
  or 0 for uint32 keys: :func:`prunax.selection.lowest_score`): scores for growing among
  the weights that are not kept."""
  return jnp.where(kept, selection.lowest_score(score), score)


@dataclasses.dataclass(frozen=True)
class StaticRandomSparse(BaseUpdater):
  """Random masks at the target sparsity, fixed for the whole training."""

  scheduler: object = sparsity_schedules.NoUpdateSchedule()

  def init_masks(self, params, targets):
    """Random masks, already at the target sparsity."""
    return self.random_masks(params, targets)

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    return jax.tree.map(jnp.abs, params)


@dataclasses.dataclass(frozen=True)
class SET(StaticRandomSparse):
  """Sparse Evolutionary Training: drop by magnitude, grow at random.

  Attributes:
    drop_fraction: fraction of the active weights replaced at each mask update.
    drop_fraction_fn: 'cosine' (the papers' choice: decays to 0 at the scheduler's
      ``update_end_step``, which it needs) or 'constant'. None (the default) means
      'cosine' when the scheduler has an ``update_end_step``; without one, masks update
      until training ends, so the fraction stays constant and a warning says how to get
      the cosine decay (pass 'constant' explicitly to silence it).
  """

  scheduler: object = sparsity_schedules.PeriodicSchedule(update_freq=100)
  drop_fraction: float = 0.3
  drop_fraction_fn: str | None = None
  supported_structures = (sparsity_types.Unstructured,)

  def __post_init__(self):
    super().__post_init__()
    _checks.assign(
      self, drop_fraction=_checks.number(self.drop_fraction, 'drop_fraction', 0.0, 1.0)
    )
    if self.drop_fraction_fn is not None and not callable(self.drop_fraction_fn):
      # None: cosine with an end step, else constant; or fn(step), e.g. an optax schedule.
      _checks.choice(self.drop_fraction_fn, 'drop_fraction_fn', ('cosine', 'constant'))
    end = getattr(self.scheduler, 'update_end_step', None)
    name = type(self).__name__
    if self.drop_fraction_fn == 'cosine' and not end:
      raise ValueError(
        f'{name}: drop_fraction_fn="cosine" decays the drop fraction to 0 at the '
        f"scheduler's update_end_step, but {self.scheduler!r} has none; pass e.g. "
        'scheduler=PeriodicSchedule(update_freq, update_start_step, update_end_step=...) '
        '(config: update_end_step), or drop_fraction_fn="constant".'
      )
    if self.drop_fraction_fn is None:
      if end:
        object.__setattr__(self, 'drop_fraction_fn', 'cosine')
      else:
        warnings.warn(
          f'{name}: the scheduler has no update_end_step, so masks update until training '
          f"ends with a constant drop fraction {self.drop_fraction}. For the paper's "
          'cosine decay give an update_end_step (e.g. 75% of the steps); pass '
          'drop_fraction_fn="constant" to keep this and silence the warning.',
          UserWarning,
          stacklevel=3,
        )
        object.__setattr__(self, 'drop_fraction_fn', 'constant')
    if not isinstance(self.sparsity_type, self.supported_structures):
      kinds = ' or '.join(_STRUCTURE_NAMES.get(t, t.__name__) for t in self.supported_structures)
      raise ValueError(
        f'{name} drops and grows individual weights and supports only '
        f'{kinds} sparsity, got {self.sparsity_type!r}; it needs a {kinds} sparsity_type.'
      )

  def drop_fraction_at(self, step) -> jax.Array:
    """Drop fraction at ``step``: constant, or cosine-decayed to 0 at update_end_step."""
    if callable(self.drop_fraction_fn):  # jaxpruner's form, e.g. an optax schedule.
      return jnp.asarray(self.drop_fraction_fn(step), jnp.float32)
    if self.drop_fraction_fn == 'constant':
      return jnp.float32(self.drop_fraction)
    end = self.scheduler.update_end_step
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), end) / end
    return self.drop_fraction * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  def drop_scores(self, params, sparse_state, grads):
    """Scores of active weights for keeping (the lowest are dropped): ``|w|``."""
    del sparse_state, grads
    return jax.tree.map(lambda w: selection.Lazy(jnp.abs, w), params)

  def grow_scores(self, params, sparse_state, grads):
    """Scores of inactive weights for growing: for SET random uint32 keys, distinct within
    a leaf (:meth:`random_keys`), so the grown weights are a uniformly random choice."""
    del grads
    return self.random_keys(params, self.rng_key(sparse_state, salt=3))

  def compute_lazy_masks(
    self, params, sparsities, sparse_state=None, grads=None, old_masks=None, **kwargs
  ):
    if sparse_state is None or old_masks is None:  # instant_sparsify: plain magnitude.
      return super().compute_lazy_masks(
        params, sparsities, sparse_state, grads, old_masks, **kwargs
      )
    fraction = self.drop_fraction_at(sparse_state.count)
    drop = self.drop_scores(params, sparse_state, grads)
    grow = self.grow_scores(params, sparse_state, grads)

    def counts(s, size):
      # Masks stay at their target count (exact at init, drop and grow keep it).
      n_active = size - sparsity_types.num_zeros(s, size)
      # floor, as the reference (an int cast of the float product).
      n_drop = jnp.floor(fraction * n_active).astype(jnp.int32)
      # The weights that may grow: all but the kept ones.
      return n_active - n_drop, n_drop, size - n_active + n_drop

    def drop_and_grow(olds, ws, ds, gs, ss):
      # Leaves of one size at one (shared) sparsity share their counts, traced once (and
      # one clip in topk_masks), not once a leaf.
      n_keep, n_drop, n_free = zip(
        *selection.once_per_value(counts, ss, [w.size for w in ws]), strict=True
      )
      # One selection loop drops from every leaf, one grows in every leaf. The old masks
      # are unpacked inside each pass that reads them; the kept masks are stored as packed
      # bits (1/32 of the weights' bytes), read by each pass of the grow search.
      kept = selection.topk_masks(
        [selection.Lazy(active_score, m, d) for m, d in zip(olds, ds, strict=True)],
        list(n_keep),
        lazy=True,
      )
      # Alike kept masks are evaluated and packed by one computation (pack_masks).
      kept = [lazy_mask(k, w.shape) for k, w in zip(pack_masks(kept), ws, strict=True)]
      # Distinct grow keys (SET's) never tie: no tie-break. 0, the kept weights'
      # key, is below them all, and n_drop is at most the number of the others. They are
      # uniform too, so the first pass needs no sample: size - n_keep of them compete.
      distinct = all(selection.distinct_keys(g) for g in gs)
      grown = selection.topk_masks(
        [selection.Lazy(inactive_score, k, g) for k, g in zip(kept, gs, strict=True)],
        list(n_drop),
        lazy=True,
        distinct=distinct,
        uniform=list(n_free) if distinct else None,
      )
      # Lazy: the engine evaluates and stores alike masks together (store_masks).
      return [selection.Lazy(jnp.logical_or, k, g) for k, g in zip(kept, grown, strict=True)]

    # All pruned leaves at once (one selection loop per group of equal layer count).
    return apply_to_pruned(
      lambda *xs: selection.map_layer_groups(drop_and_grow, xs[-1], *xs[:-1]),
      old_masks,
      old_masks,
      params,
      drop,
      grow,
      sparsities,
      self.layer_axes_tree(params),
    )


@dataclasses.dataclass(frozen=True)
class RigL(SET):
  """Rigging the Lottery: drop by magnitude, grow by largest gradient magnitude.

  As in the paper's code (and jaxpruner), a mask-update step makes no gradient step: the
  kept weights do not move on that step (the optimizer's state still advances).

  Examples:
    Masks start at the target sparsity; a mask update drops the active weights of
    smallest magnitude and grows the inactive ones of largest gradient, at zero:

    >>> import jax.numpy as jnp, optax, prunax
    >>> pruner = prunax.RigL(
    ...   sparsity=0.75,  # 4 of 16 weights kept
    ...   drop_fraction=0.5,
    ...   scheduler=prunax.sparsity_schedules.PeriodicSchedule(update_freq=1, update_end_step=10),
    ... )
    >>> params = {'w': jnp.arange(1.0, 17.0).reshape(4, 4)}
    >>> tx = pruner.wrap_optax(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> before = prunax.bool_masks(state, params)['w']
    >>> int(before.sum())
    4
    >>> grads = {'w': jnp.where(before, 0.0, params['w'])}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> after = prunax.bool_masks(state, params)['w']
    >>> int(after.sum()), int((after & ~before).sum())  # 2 dropped, 2 grown
    (4, 2)
    >>> params['w'][after & ~before].tolist()  # grown weights start at zero
    [0.0, 0.0]
    >>> round(float(pruner.drop_fraction_at(5)), 4)  # cosine decay to 0 at update_end_step
    0.25
  """

  skip_gradient_on_mask_update = True

  def grow_scores(self, params, sparse_state, grads):
    if grads is None:
      raise ValueError('RigL grows by gradient magnitude and needs gradients.')
    return jax.tree.map(lambda g: selection.Lazy(jnp.abs, g), grads)

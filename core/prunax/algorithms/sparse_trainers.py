"""Sparse-to-sparse training: static random masks, SET and RigL.

Masks are drawn at random at ``init``, already at the target sparsity of the
distribution (ERK is the usual choice). SET (Mocanu et al., 2018) and RigL (Evci et al.,
2020) update them every ``update_freq`` steps: among the ``n`` active weights of a leaf,
``round(f * n)`` with the smallest magnitude are dropped (``f`` is the drop fraction,
cosine-decayed to 0 at ``update_end_step`` by default), and as many inactive ones are
grown, chosen at random (SET) or by largest gradient magnitude (RigL). Grown weights
start at zero and their optimizer moments are reset; the count of active weights never
changes. Dropped weights may be grown again in the same update (then they keep their
value). Ties are broken by the lowest flat index.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from prunax import _checks
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.base_updater import BaseUpdater
from prunax.base_updater import _is_none
from prunax.base_updater import lazy_mask
from prunax.base_updater import pack_mask


def _active_magnitude(mask, w):
  return jnp.where(mask, jnp.abs(w), -jnp.inf)


def _inactive_score(kept, score):
  return jnp.where(kept, -jnp.inf, score)


@dataclasses.dataclass(frozen=True)
class StaticRandomSparse(BaseUpdater):
  """Random masks at the target sparsity, fixed for the whole training."""

  scheduler: object = sparsity_schedules.NoUpdateSchedule()
  is_sparse_training = True
  scheduler_kind = 'none'

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    return jax.tree.map(jnp.abs, params)


@dataclasses.dataclass(frozen=True)
class SET(StaticRandomSparse):
  """Sparse Evolutionary Training: drop by magnitude, grow at random.

  Attributes:
    drop_fraction: fraction of the active weights replaced at each mask update.
    drop_fraction_fn: 'cosine' (decays to 0 at the scheduler's update_end_step) or
      'constant'.
  """

  scheduler: object = sparsity_schedules.PeriodicSchedule(update_freq=100)
  drop_fraction: float = 0.3
  drop_fraction_fn: str = 'cosine'
  scheduler_kind = 'periodic'

  def __post_init__(self):
    super().__post_init__()
    _checks.assign(self, drop_fraction=_checks.number(self.drop_fraction, 'drop_fraction', 0.0,
                                                      1.0))
    if not callable(self.drop_fraction_fn):  # or fn(step), e.g. an optax schedule
      _checks.choice(self.drop_fraction_fn, 'drop_fraction_fn', ('cosine', 'constant'))
    if not isinstance(self.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(f'{type(self).__name__} drops and grows individual weights and supports '
                       f'only unstructured sparsity, got {self.sparsity_type!r}.')

  def drop_fraction_at(self, step) -> jax.Array:
    """Drop fraction at ``step``: constant, or cosine-decayed to 0 at update_end_step."""
    if callable(self.drop_fraction_fn):  # jaxpruner's form, e.g. an optax schedule.
      return jnp.asarray(self.drop_fraction_fn(step), jnp.float32)
    end = getattr(self.scheduler, 'update_end_step', None)
    if self.drop_fraction_fn == 'constant' or not end:
      return jnp.float32(self.drop_fraction)
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), end) / end
    return self.drop_fraction * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  def grow_scores(self, params, sparse_state, grads):
    """Scores of inactive weights for growing: uniform random for SET."""
    del grads
    return self._random_scores(params, self._key(sparse_state, salt=3))

  def compute_masks(self, params, sparsities, sparse_state=None, grads=None, old_masks=None,
                    **kwargs):
    if sparse_state is None or old_masks is None:  # instant_sparsify: plain magnitude.
      return super().compute_masks(params, sparsities, sparse_state, grads, old_masks, **kwargs)
    fraction = self.drop_fraction_at(sparse_state.count)
    grow = self.grow_scores(params, sparse_state, grads)

    def drop_and_grow(old, w, g, s):
      # Masks stay at their target count (exact at init, drop and grow keep it).
      n_active = w.size - sparsity_types.num_zeros(s, w.size)
      n_drop = jnp.round(fraction * n_active).astype(jnp.int32)
      # The old mask is unpacked inside each pass that reads it; the kept mask is stored
      # as packed bits (1/32 of the weights' bytes), read by each pass of the grow search.
      kept = selection.topk_mask(selection.Lazy(_active_magnitude, old, w),
                                 n_active - n_drop, lazy=True)
      kept = lazy_mask(pack_mask(selection.materialize(kept)), w.shape)
      grown = selection.topk_mask(selection.Lazy(_inactive_score, kept, g), n_drop, lazy=True)
      return selection.materialize(selection.Lazy(jnp.logical_or, kept, grown))

    def per_leaf(m, w, g, s, axis):
      if m is None:
        return None
      if axis is None:
        return drop_and_grow(m, w, g, s)
      return selection.map_layers(lambda *x: drop_and_grow(*x, s), axis, m, w, g)

    return jax.tree.map(per_leaf, old_masks, params, grow, sparsities,
                        self.layer_axes_tree(params), is_leaf=_is_none)


@dataclasses.dataclass(frozen=True)
class RigL(SET):
  """Rigging the Lottery: drop by magnitude, grow by largest gradient magnitude."""

  def grow_scores(self, params, sparse_state, grads):
    if grads is None:
      raise ValueError('RigL grows by gradient magnitude and needs gradients.')
    return jax.tree.map(lambda g: selection.Lazy(jnp.abs, g), grads)

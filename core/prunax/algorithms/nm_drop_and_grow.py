"""N:M-aware drop and grow: SET and RigL that keep an N:M pattern.

As in SRigL (Lasby et al., 2023) and Chase (Yin et al., 2023), dynamic sparse training
whose masks stay hardware-friendly: the mask is N:M (``n`` of every ``m`` consecutive
weights along :class:`prunax.NByM`'s axis, the input axis of kernels by default) from
``init`` on. A mask update drops, across the leaf, the ``floor(f * n_active)`` active
weights of smallest magnitude (``f``: the drop fraction, as in SET/RigL), then refills
every group to ``n`` with its inactive weights of largest grow score: random (SET) or
gradient magnitude (RigL). Dropped weights may be regrown.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prunax import _xla_workarounds
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.algorithms.sparse_trainers import SET
from prunax.algorithms.sparse_trainers import RigL
from prunax.tree_util import apply_to_pruned


class _NMDropAndGrow:
  """Drop and grow within N:M groups (a mixin of :class:`SET` subclasses)."""

  supported_structures = (sparsity_types.NByM,)

  def compute_masks(self, params, sparsities, sparse_state=None, grads=None, old_masks=None):
    if sparse_state is None or old_masks is None:  # instant_sparsify: plain N:M magnitude.
      return super().compute_masks(params, sparsities, sparse_state, grads, old_masks)
    fraction = self.drop_fraction_at(sparse_state.count)
    drop = self.drop_scores(params, sparse_state, grads)
    grow = self.grow_scores(params, sparse_state, grads)
    nm = self.sparsity_type

    def drop_and_grow(olds, ds, gs):
      # The old masks stay lazy (unpacked where read, not stored: a byte a weight).
      n_active = [
        _xla_workarounds.count_true(selection.materialize(old), tuple(range(old.ndim - 1)))
        for old in olds
      ]
      n_drop = [jnp.floor(fraction * n).astype(jnp.int32) for n in n_active]
      # One selection loop drops from every leaf (a loop per leaf, as topk_mask of each,
      # compiled in 4.7 s at 16 layers of 256 x 256: 10x the dense step's).
      kept = selection.topk_masks(
        [selection.Lazy(jnp.where, old, d, -jnp.inf) for old, d in zip(olds, ds, strict=True)],
        [n - k for n, k in zip(n_active, n_drop, strict=True)],
      )
      out = []
      for keep, g in zip(kept, gs, strict=True):
        # Kept weights (at most n per group, a subset of the old N:M mask) outrank any
        # candidate, so every group keeps them and grows its best candidates to n: the
        # largest key, above every float score's (+inf's too); SET's random keys reach
        # it too (selection.hash_keys: the upper half), so candidates stop one below.
        keys = selection.sortable_keys(selection.materialize(g))
        top = jnp.uint32(2**32 - 1)
        score = jnp.where(keep, top, jnp.minimum(keys, top - 1))
        out.append(selection.n_by_m_mask(score, nm.n, nm.m, nm.axis_for(score.ndim)))
      return out

    return apply_to_pruned(drop_and_grow, old_masks, old_masks, drop, grow)


@dataclasses.dataclass(frozen=True)
class NMSET(_NMDropAndGrow, SET):
  """SET within N:M groups (grow at random)."""

  sparsity: float | None = 0.5
  sparsity_type: Any = sparsity_types.NByM(2, 4)
  scheduler: object = sparsity_schedules.PeriodicSchedule(update_freq=100)


@dataclasses.dataclass(frozen=True)
class NMRigL(_NMDropAndGrow, RigL):
  """RigL within N:M groups (grow by gradient magnitude)."""

  sparsity: float | None = 0.5
  sparsity_type: Any = sparsity_types.NByM(2, 4)
  scheduler: object = sparsity_schedules.PeriodicSchedule(update_freq=100)

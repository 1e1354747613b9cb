"""How the masks of several leaves are chosen from their scores: per leaf or globally.

An algorithm names its strategy in its class (``selection_strategy``); the strategy checks
the updater's configuration and turns scores into exact keep-masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from prunax import _checks
from prunax import selection
from prunax import sparsity_distributions
from prunax import sparsity_types
from prunax.tree_util import apply_to_pruned
from prunax.tree_util import is_none

PyTree = Any


def is_erk(dist: Any) -> bool:
  """Whether ``dist`` is the ERK distribution (possibly with a filter or map, bound by
  :class:`prunax.sparsity_distributions.Partial` or ``functools.partial``)."""
  return sparsity_distributions.unwrapped(dist)[0] is sparsity_distributions.erk


@dataclasses.dataclass(frozen=True)
class PerLeaf:
  """Every pruned leaf (every layer of a stacked leaf) is pruned to its own sparsity."""

  name = 'per-leaf'

  def check(self, updater: Any) -> None:
    """Any structure and distribution goes."""
    del updater

  def masks(self, updater: Any, scores: PyTree, sparsities: PyTree, lazy: bool = False) -> PyTree:
    """Exact keep-masks of every leaf at its sparsity (None: the leaf is not pruned), all
    leaves at once (``SparsityType.masks``: one selection loop for unstructured); with
    ``lazy``, masks may be :class:`prunax.selection.Lazy`."""
    structure = updater.sparsity_type
    lazy = {'lazy': True} if lazy and _checks.accepts_keyword(structure.masks, 'lazy') else {}
    return apply_to_pruned(
      lambda xs, ss, axes: structure.masks(xs, ss, axes, **lazy),
      sparsities,
      scores,
      sparsities,
      updater.layer_axes_tree(scores),
    )


@dataclasses.dataclass(frozen=True)
class GlobalThreshold:
  """One threshold over all leaves at the distribution's target sparsity (the target is
  their total); leaves a custom map gives another sparsity are pruned on their own
  (0.0 keeps a leaf dense)."""

  name = 'global'

  def check(self, updater: Any) -> None:
    """Only unstructured sparsity, and not ERK (the threshold chooses per-leaf sparsities)."""
    name = type(updater).__name__
    if not isinstance(updater.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(
        f'{name} supports only unstructured sparsity, got {updater.sparsity_type!r}.'
      )
    if is_erk(updater.sparsity_distribution_fn):
      raise ValueError(
        f'{name} chooses per-layer sparsities itself with one '
        'global threshold; use the "uniform" distribution (with a '
        'custom_sparsity_map for layers that differ), not ERK.'
      )

  def masks(self, updater: Any, scores: PyTree, sparsities: PyTree, lazy: bool = False) -> PyTree:
    """Exact keep-masks: the pooled leaves share one threshold, the others are per leaf;
    with ``lazy``, the pooled leaves' masks are :class:`prunax.selection.Lazy`."""
    axes = updater.layer_axes_tree(scores)
    flat_s, treedef = jax.tree.flatten(sparsities, is_leaf=is_none)
    flat_x = treedef.flatten_up_to(scores)
    flat_a = treedef.flatten_up_to(axes)
    shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32) if isinstance(x, selection.Lazy) else x,
      scores,
    )
    static = treedef.flatten_up_to(updater.target_sparsities(shapes))
    pooled = [s is not None and t == updater.sparsity for s, t in zip(flat_s, static, strict=True)]
    chosen = [x for x, p in zip(flat_x, pooled, strict=True) if p]
    total = sum(math.prod(x.shape) for x in chosen)
    target = next((s for s, p in zip(flat_s, pooled, strict=True) if p), 0.0)
    it = iter(
      selection.global_topk_masks(
        chosen, total - sparsity_types.num_zeros(target, total), lazy=lazy
      )
    )
    # The other pruned leaves (their own sparsities) by one selection (per layer count).
    alone = [
      i for i, (s, p) in enumerate(zip(flat_s, pooled, strict=True)) if s is not None and not p
    ]
    own = iter(
      updater.sparsity_type.masks(
        [flat_x[i] for i in alone], [flat_s[i] for i in alone], [flat_a[i] for i in alone]
      )
      if alone
      else ()
    )
    return treedef.unflatten(
      [
        next(it) if p else (None if s is None else next(own))
        for s, p in zip(flat_s, pooled, strict=True)
      ]
    )

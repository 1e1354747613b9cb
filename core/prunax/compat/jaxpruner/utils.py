"""Sparsity summaries in jaxpruner's format.

Per-leaf entries are keyed by the ``/``-joined path without a prefix (``'Dense_0/kernel'``;
list entries by their index), every leaf is counted (biases too), a None leaf maps to None,
and values are float32 scalars. prunax's own :func:`prunax.summarize_sparsity` also
returns the three ``'_...'`` totals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prunax.sparsity_distributions import path_name

PyTree = Any


def _entries(tree: PyTree) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return [(path_name(p), x) for p, x in flat]


def summarize_sparsity(param_tree: PyTree, only_total_sparsity: bool = False) -> dict[str, Any]:
  """Fraction of zeros of every leaf and in total.

  Args:
    param_tree: params or masks (None leaves are reported as None and not counted).
    only_total_sparsity: return only ``'_total_sparsity'``, ``'_nparams'`` and
      ``'_nparams_nnz'``.

  Returns:
    The totals, plus ``{name: sparsity}`` per leaf unless ``only_total_sparsity``.
  """
  summary: dict[str, Any] = {}
  nnz = size = 0
  for name, x in _entries(param_tree):
    if x is None:
      if not only_total_sparsity:
        summary[name] = None
      continue
    leaf_nnz, leaf_size = int(jnp.count_nonzero(x)), int(jnp.size(x))
    nnz, size = nnz + leaf_nnz, size + leaf_size
    if not only_total_sparsity:
      summary[name] = jnp.float32(1.0 - leaf_nnz / max(leaf_size, 1))
  summary['_total_sparsity'] = jnp.float32(1.0 - nnz / max(size, 1))
  summary['_nparams_nnz'] = jnp.float32(nnz)
  summary['_nparams'] = jnp.float32(size)
  return summary


def summarize_intersection(
  mask_tree1: PyTree, mask_tree2: PyTree, only_total_intersection: bool = False
) -> dict[str, Any]:
  """Fraction of the ones of ``mask_tree1`` that are also ones in ``mask_tree2``.

  Args:
    mask_tree1: masks (None leaves are reported as None).
    mask_tree2: masks with the same structure.
    only_total_intersection: return only ``'_total_intersection'``.

  Returns:
    ``{'_total_intersection': ...}`` plus the fraction per leaf; 0 where tree 1 keeps
    nothing.
  """
  first, second = _entries(mask_tree1), _entries(mask_tree2)
  if [n for n, _ in first] != [n for n, _ in second]:
    raise ValueError(
      'summarize_intersection needs two mask trees with the same leaves; got '
      f'{[n for n, _ in first]} and {[n for n, _ in second]}.'
    )
  summary: dict[str, Any] = {}
  inter_total = ones_total = 0
  for (name, a), (_, b) in zip(first, second, strict=True):
    if a is None:
      if not only_total_intersection:
        summary[name] = None
      continue
    inter = int(jnp.sum((jnp.asarray(a) != 0) & (jnp.asarray(b) != 0)))
    ones = int(jnp.sum(jnp.asarray(a) != 0))
    inter_total, ones_total = inter_total + inter, ones_total + ones
    if not only_total_intersection:
      summary[name] = jnp.float32(inter / max(ones, 1))
  summary['_total_intersection'] = jnp.float32(inter_total / max(ones_total, 1))
  return summary

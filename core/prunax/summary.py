"""Sparsity reports over parameter or mask trees."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import layers
from prunax.layers import slice_shape
from prunax.sparsity_distributions import named_leaves

PyTree = Any


def summarize_sparsity(
  tree: PyTree,
  only_total: bool = False,
  filter_fn: Callable[[str, Any], bool] | None = None,
  layer_axes: Mapping[str, int] | None = None,
  *,
  only_total_sparsity: bool | None = None,
) -> dict[str, float]:
  """Fraction of zeros per leaf and in total.

  Args:
    tree: params or boolean/uint8 masks (unpack packed masks first with
      :func:`prunax.unpack_masks`). None leaves are skipped.
    only_total: return only the totals.
    filter_fn: ``fn(name, leaf) -> bool`` selecting the leaves counted (default: every
      leaf with ndim >= 2, i.e. the leaves the default distributions prune).
    layer_axes: ``{name or regex: axis}`` of stacked leaves, as an updater takes them
      (or ``updater.layer_axes_of(params)``): each layer is also reported, as
      ``'sparsity/<name>/layer_<i>'``, and the filter sees one layer.
    only_total_sparsity: jaxpruner's name for ``only_total``.

  Returns:
    ``{'total_sparsity', 'total_params', 'total_nonzero'}`` plus ``'sparsity/<name>'``
    for every counted leaf, and jaxpruner's totals over every leaf whatever the filter:
    ``'_total_sparsity'``, ``'_nparams'``, ``'_nparams_nnz'``.

  Examples:
    >>> import jax.numpy as jnp, prunax
    >>> summary = prunax.summarize_sparsity(
    ...   {'w': jnp.array([[0.0, 1.0], [2.0, 0.0]]), 'b': jnp.zeros(2)}
    ... )
    >>> summary['sparsity/w'], summary['total_sparsity'], summary['total_nonzero']
    (0.5, 0.5, 2.0)
    >>> 'sparsity/b' in summary, round(summary['_total_sparsity'], 4)  # b: ndim < 2
    (False, 0.6667)
  """
  if only_total_sparsity is not None:
    only_total = only_total_sparsity
  filter_fn = filter_fn or (lambda name, leaf: np.ndim(leaf) >= 2)
  # Names or regular expressions, as updaters take them; a key that matches no leaf is
  # refused (looked up by exact name, a regex key reported no layer and no error).
  layer_axes = layers.resolve_mapping(tree, layer_axes, 'leaf')

  def one_layer(name, x):
    axis = layer_axes.get(name)
    if axis is None:
      return x
    return jax.ShapeDtypeStruct(slice_shape(np.shape(x), axis), jnp.result_type(x))

  every = named_leaves(tree)
  counted = [filter_fn(n, one_layer(n, x)) for n, x in every]
  leaves = [leaf for leaf, c in zip(every, counted, strict=True) if c]
  all_nz = jax.device_get([jnp.count_nonzero(x) for _, x in every])
  all_size = sum(int(np.size(x)) for _, x in every)
  nonzero = [nz for nz, c in zip(all_nz, counted, strict=True) if c]
  per_layer = jax.device_get(
    {
      n: jnp.count_nonzero(x, axis=tuple(i for i in range(np.ndim(x)) if i != layer_axes[n]))
      for n, x in leaves
      if n in layer_axes
    }
  )
  summary: dict[str, float] = {}
  total = total_nz = 0
  for (name, x), nz in zip(leaves, nonzero, strict=True):
    size = int(np.size(x))
    total += size
    total_nz += int(nz)
    if not only_total:
      summary[f'sparsity/{name}'] = 1.0 - int(nz) / size if size else 0.0
      if name in per_layer:
        layer_size = size // max(len(per_layer[name]), 1)
        for i, layer_nz in enumerate(per_layer[name]):
          summary[f'sparsity/{name}/layer_{i}'] = (
            1.0 - int(layer_nz) / layer_size if layer_size else 0.0
          )
  summary['total_sparsity'] = 1.0 - total_nz / total if total else 0.0
  summary['total_params'] = float(total)
  summary['total_nonzero'] = float(total_nz)
  summary['_total_sparsity'] = 1.0 - int(sum(all_nz)) / all_size if all_size else 0.0
  summary['_nparams'] = float(all_size)
  summary['_nparams_nnz'] = float(sum(int(nz) for nz in all_nz))
  return summary


def summarize_intersection(
  masks_a: PyTree, masks_b: PyTree, *, only_total_intersection: bool = False
) -> dict[str, float]:
  """How much two mask trees agree (e.g. masks at two steps, or of two algorithms).

  Args:
    masks_a: boolean or uint8 masks (None leaves skipped).
    masks_b: masks with the same structure.
    only_total_intersection: return only the totals (jaxpruner's keyword).

  Returns:
    Per leaf and in total: ``'iou/<name>'`` (intersection over union of kept weights)
    and ``'kept_fraction/<name>'`` (fraction of a's kept weights also kept in b), and
    jaxpruner's ``'_total_intersection'``: the total kept fraction, 0.0 when a keeps
    nothing.
  """
  a_leaves = named_leaves(masks_a)
  b_leaves = named_leaves(masks_b)
  if [n for n, _ in a_leaves] != [n for n, _ in b_leaves]:
    raise ValueError(
      'summarize_intersection needs two mask trees with the same leaves; got '
      f'{[n for n, _ in a_leaves]} and {[n for n, _ in b_leaves]}.'
    )
  counts = jax.device_get(
    [
      (jnp.sum((a != 0) & (b != 0)), jnp.sum((a != 0) | (b != 0)), jnp.sum(a != 0))
      for (_, a), (_, b) in zip(a_leaves, b_leaves, strict=True)
    ]
  )
  out: dict[str, float] = {}
  tot = np.zeros(3)
  for (name, _), (inter, union, kept) in zip(a_leaves, counts, strict=True):
    if not only_total_intersection:
      out[f'iou/{name}'] = float(inter / union) if union else 1.0
      out[f'kept_fraction/{name}'] = float(inter / kept) if kept else 1.0
    tot += (inter, union, kept)
  out['total_iou'] = float(tot[0] / tot[1]) if tot[1] else 1.0
  out['total_kept_fraction'] = float(tot[0] / tot[2]) if tot[2] else 1.0
  out['_total_intersection'] = float(tot[0] / max(tot[2], 1))
  return out

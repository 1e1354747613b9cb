"""Layer axes: stacked (scanned) parameters whose slices along one axis are layers.

``flax.linen.scan``, ``nnx.vmap``/``nnx.scan``-stacked modules, MaxText and flaxformer's
``scan_layers`` store the same parameter of ``L`` layers as one array with a layer axis,
e.g. a ``(layers, d_in, d_out)`` kernel. prunax treats every slice along a declared layer
axis as its own layer: per-layer sparsity targets, ERK fan-in/fan-out of the slice,
selection, N:M/block/channel groups and summaries are per slice.

Layer axes come from two places:

* declared on the updater, ``layer_axes={'decoder/layers/.*': 0}``: keys are parameter
  names (``/``-joined key paths, see :func:`prunax.sparsity_distributions.path_name`) or
  regular expressions matching whole names, values the axis;
* read from the model's own metadata when the params carry it: flax boxed params (linen
  ``nn.Partitioned``/``LogicallyPartitioned`` with ``names``, nnx ``Variable`` with
  ``out_sharding``) whose logical axis names contain ``'layers'``. For params that were
  unboxed before reaching the optimizer, :func:`layer_axes_from_flax` reads the boxed
  variables (or a t5x/flaxformer ``params_axes`` collection) and returns the mapping to
  pass as ``layer_axes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from prunax.sparsity_distributions import matching_names
from prunax.sparsity_distributions import path_name

PyTree = Any
LAYER_AXIS_NAME = 'layers'
# Names that suggest a stacked leaf (flax's nn.scan names modules 'Scan<Class>_<i>').
_STACKED_NAME = re.compile(
  r'(^|/)(scan\w*|\w*layers|\w*stack\w*|blocks|repeat\w*)(/|$)', re.IGNORECASE
)


def freeze(spec: Mapping[str, int] | None) -> tuple[tuple[str, int], ...]:
  """Validates a ``{name or regex: axis}`` mapping and returns it as sorted pairs."""
  if spec is None:
    return ()
  if isinstance(spec, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in spec):
    spec = dict(spec)
  if not isinstance(spec, Mapping):
    raise TypeError(
      'layer_axes must be a mapping {parameter name or regex: axis}, e.g. '
      f"{{'decoder/layers/.*': 0}}, got {spec!r}."
    )
  out = []
  for key, axis in spec.items():
    if not isinstance(key, str):
      raise TypeError(f'layer_axes keys must be parameter names or regexes (str), got {key!r}.')
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
      raise TypeError(f'layer_axes[{key!r}] must be an integer axis, got {axis!r}.')
    out.append((key, int(axis)))
  return tuple(sorted(out))


def _is_box(x) -> bool:
  # flax linen AxisMetadata boxes (names + unbox) and nnx Variables (get_metadata).
  return (hasattr(x, 'unbox') and hasattr(x, 'names')) or (
    hasattr(x, 'get_metadata') and hasattr(x, 'get_value')
  )


def _box_names(box) -> tuple | None:
  names = getattr(box, 'names', None)
  if names is None and hasattr(box, 'get_metadata'):
    meta = box.get_metadata()
    names = meta.get('out_sharding', meta.get('sharding'))
  try:
    return tuple(names)
  except TypeError:
    return None


def _axis_of(names, layer_name: str) -> int | None:
  if not names:
    return None
  hits = [i for i, n in enumerate(names) if n == layer_name]
  return hits[0] if hits else None


def boxed_layer_axes(tree: PyTree, layer_name: str = LAYER_AXIS_NAME) -> dict[str, int]:
  """Layer axes read from flax boxes in ``tree`` (``{leaf name: axis}``).

  Args:
    tree: params that may hold flax boxes (linen ``Partitioned``, nnx ``Variable``).
    layer_name: the logical axis name that marks the layer axis.
  """
  out: dict[str, int] = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
  for path, leaf in flat:
    if not _is_box(leaf):
      continue
    axis = _axis_of(_box_names(leaf), layer_name)
    if axis is None:
      continue
    out[path_name(path)] = axis  # the box's own '.value' is not part of a name
  return out


def layer_axes_from_flax(
  variables: PyTree, params_axes: PyTree | None = None, layer_name: str = LAYER_AXIS_NAME
) -> dict[str, int]:
  """The ``layer_axes`` mapping of a flax model, for params that are unboxed.

  Args:
    variables: boxed params as the model creates them (linen ``model.init(...)['params']``
      with ``nn.with_logical_partitioning``/``nn.scan(metadata_params=...)``, or
      ``nnx.state(model, nnx.Param)``). Names are those of the same tree unboxed.
    params_axes: optional t5x/flaxformer ``params_axes`` collection (``AxisMetadata``
      entries named ``<param>_axes``), read for the params in ``variables``.
    layer_name: the logical axis name of the layer axis.

  Returns:
    ``{parameter name: layer axis}``, to pass as an updater's ``layer_axes``.
  """
  out = boxed_layer_axes(variables, layer_name)
  if params_axes is not None:
    flat, _ = jax.tree_util.tree_flatten_with_path(params_axes, is_leaf=_is_box)
    for path, leaf in flat:
      name = path_name(path)
      if not name.endswith('_axes'):
        continue
      axis = _axis_of(tuple(getattr(leaf, 'names', ()) or ()), layer_name)
      if axis is not None:
        out[name[: -len('_axes')]] = axis
  return out


def resolve_mapping(
  params: PyTree, layer_axes: Mapping[str, int] | None, what: str = 'parameter'
) -> dict[str, int]:
  """:func:`resolve` of ``layer_axes`` given as updaters take them (``{name or regex:
  axis}``), for the functions that take them as an argument (distributions, summaries);
  ``{}`` without any (boxed axes are the updaters' to read)."""
  return resolve(params, freeze(layer_axes), what) if layer_axes else {}


def resolve(
  params: PyTree, spec: tuple[tuple[str, int], ...], what: str = 'parameter'
) -> dict[str, int]:
  """``{leaf name: non-negative layer axis}`` for ``params``: boxes, then ``spec``. A None
  leaf (a mask tree's unpruned leaf) is a name a key may match, with no axis.

  Raises:
    ValueError: a key of ``spec`` matches no leaf (``what`` names them in the message),
      or an axis is out of range.
  """
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
  leaves = dict((path_name(p), leaf) for p, leaf in flat)
  axes = boxed_layer_axes(params)
  for key, axis in spec:
    hits = matching_names(key, list(leaves))
    if not hits:
      raise ValueError(
        f'layer_axes key {key!r} matches no {what}; {what} names are: {list(leaves)}.'
      )
    for name in hits:
      if leaves[name] is not None:
        axes[name] = axis
  for name, axis in list(axes.items()):
    ndim = np.ndim(leaves[name]) if name in leaves else 0
    if not -ndim <= axis < ndim or ndim < 2:
      raise ValueError(
        f'layer axis {axis} of parameter {name!r} with shape '
        f'{tuple(np.shape(leaves.get(name)))} is out of range; a stacked '
        f'parameter has at least 2 dimensions and a layer axis in '
        f'{-ndim}..{ndim - 1}.'
      )
    axes[name] = axis % ndim
  return axes


def slice_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
  """The shape of one layer of a leaf (the shape itself when ``axis`` is None)."""
  shape = tuple(shape)
  return shape if axis is None else shape[:axis] + shape[axis + 1 :]


def looks_stacked(name: str, leaf) -> bool:
  """Whether an undeclared leaf looks like a stack of layers (for a warning)."""
  return np.ndim(leaf) >= 3 and _STACKED_NAME.search(name) is not None

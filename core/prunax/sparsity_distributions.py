"""How a target sparsity is distributed over the parameters of a model.

A distribution is a callable ``fn(params, sparsity) -> tree`` returning, for every leaf of
``params``, its sparsity (a Python float) or ``None`` when the leaf is not pruned. It only
looks at shapes, so it runs once, outside ``jit``.

Parameter names are the ``/``-joined entries of the leaf's ``jax.tree_util`` key path
(see :func:`path_name`), e.g. ``'params/Dense_0/kernel'``. A custom sparsity map is keyed
by such names; a key may also be a regular expression that must match a whole name. A key
that matches no parameter is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any
FilterFn = Callable[[str, Any], bool]


def path_name(path) -> str:
  """``'/'``-joined name of a ``jax.tree_util`` key path (dict keys, attributes, indices).

  A trailing ``.value`` attribute (the array inside a flax box: linen ``Partitioned``,
  nnx ``Variable``) is not part of the name, so boxed and unboxed params share names.
  """
  parts = []
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def named_leaves(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
  """Leaves of ``tree`` with their path names, in pytree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_name(path), leaf) for path, leaf in flat]


def default_filter(name: str, leaf) -> bool:  # pylint: disable=unused-argument
  """Prunes leaves with at least 2 dimensions (kernels, embeddings), not biases or scales."""
  return np.ndim(leaf) >= 2


def _check_sparsity(value, name: str) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'sparsity for {name!r} must be a number in [0, 1), got {value!r}.') from None
  if not 0.0 <= value < 1.0:
    raise ValueError(f'sparsity for {name!r} must be in [0, 1), got {value}.')
  return value


def _match_custom(names: list[str], custom: Mapping[str, float] | None) -> dict[str, float]:
  """Resolves custom-map keys (exact names or full-match regexes) to parameter names."""
  resolved: dict[str, float] = {}
  for key, value in (custom or {}).items():
    hits = matching_names(key, names)
    if not hits:
      raise ValueError(f'custom sparsity map key {key!r} matches no parameter; parameter names '
                       f'are: {names}.')
    for hit in hits:
      resolved[hit] = _check_sparsity(value, hit)
  return resolved


def matching_names(key: str, names: list[str]) -> list[str]:
  """Parameter names a map key selects: the name itself, else those the key (a regular
  expression) matches in full."""
  return [n for n in names if n == key] or [n for n in names if _fullmatch(key, n)]


def _fullmatch(pattern: str, name: str) -> bool:
  try:
    return re.fullmatch(pattern, name) is not None
  except re.error:
    return False


def _build(params: PyTree, values: dict[str, float | None]) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(treedef, [values.get(path_name(p)) for p, _ in flat])


def _layer_view(leaf, axis: int | None):
  """One layer of a stacked leaf as a shape/dtype struct (the leaf itself if not stacked)."""
  if axis is None:
    return leaf
  shape = tuple(np.shape(leaf))
  return jax.ShapeDtypeStruct(shape[:axis] + shape[axis + 1:], jax.numpy.result_type(leaf))


def _selected(params: PyTree, filter_fn: FilterFn | None,
              layer_axes: Mapping[str, int] | None = None) -> list[tuple[str, Any]]:
  """Leaves the filter selects; a stacked leaf is judged by one layer (its slice)."""
  filter_fn = filter_fn or default_filter
  layer_axes = layer_axes or {}
  return [(n, leaf) for n, leaf in named_leaves(params)
          if filter_fn(n, _layer_view(leaf, layer_axes.get(n)))]


def uniform(params: PyTree, sparsity: float, filter_fn: FilterFn | None = None,
            custom_sparsity_map: Mapping[str, float] | None = None,
            layer_axes: Mapping[str, int] | None = None) -> PyTree:
  """The same sparsity for every selected leaf; ``custom_sparsity_map`` overrides by name.

  Args:
    params: the parameter tree (arrays or shape/dtype structs).
    sparsity: target sparsity in [0, 1) of every selected leaf.
    filter_fn: ``fn(name, leaf) -> bool`` selecting leaves to prune (default: ndim >= 2).
    custom_sparsity_map: ``{name or regex: sparsity}``; mapped leaves are pruned at their
      own sparsity whether or not the filter selects them.
    layer_axes: ``{leaf name: axis}`` of stacked leaves (see :mod:`prunax.layers`): the
      filter sees one layer, and every layer gets the sparsity.

  Returns:
    A tree like ``params`` of floats (pruned leaves) and ``None`` (dense leaves).
  """
  sparsity = _check_sparsity(sparsity, 'all parameters')
  custom = _match_custom([n for n, _ in named_leaves(params)], custom_sparsity_map)
  values = {n: sparsity for n, _ in _selected(params, filter_fn, layer_axes)}
  values.update(custom)
  return _build(params, values)


def erk(params: PyTree, sparsity: float, filter_fn: FilterFn | None = None,
        custom_sparsity_map: Mapping[str, float] | None = None,
        erk_power_scale: float = 1.0, layer_axes: Mapping[str, int] | None = None) -> PyTree:
  """Erdos-Renyi-Kernel distribution (Evci et al., 2020, as in the RigL reference code).

  The density of leaf ``l`` is ``eps * (sum(shape_l) / prod(shape_l)) ** erk_power_scale``,
  with ``eps`` chosen so that the selected leaves (without custom-map entries) hold exactly
  ``(1 - sparsity)`` of their weights. A leaf whose density would exceed 1 is made dense
  and ``eps`` is solved again over the rest, until every density is at most 1.

  Args:
    params: the parameter tree.
    sparsity: overall target sparsity of the ERK-distributed leaves.
    filter_fn: leaf selector (default: ndim >= 2).
    custom_sparsity_map: ``{name or regex: sparsity}``; those leaves get their own
      sparsity and take no part in the ERK budget.
    erk_power_scale: exponent of the raw ERK probabilities (1.0 = ERK, 0 = uniform).
    layer_axes: ``{leaf name: axis}`` of stacked leaves (see :mod:`prunax.layers`): each
      layer is a leaf of the ERK budget with its own fan-in/fan-out (the layer axis is not
      a fan dimension), and all layers of a stack get the same sparsity.

  Returns:
    A tree like ``params`` of floats and ``None`` (dense leaves).
  """
  sparsity = _check_sparsity(sparsity, 'all parameters')
  layer_axes = layer_axes or {}
  custom = _match_custom([n for n, _ in named_leaves(params)], custom_sparsity_map)
  leaves = []  # (name, shape of one layer, number of layers)
  for n, x in _selected(params, filter_fn, layer_axes):
    if n in custom:
      continue
    shape, axis = tuple(np.shape(x)), layer_axes.get(n)
    if axis is None:
      leaves.append((n, shape, 1))
    else:
      leaves.append((n, shape[:axis] + shape[axis + 1:], shape[axis]))
  dense: set[str] = set()
  while True:
    divisor, rhs, raw = 0.0, 0.0, {}
    for name, shape, count in leaves:
      per_layer = math.prod(shape)
      n_param = per_layer * count
      if name in dense:
        rhs -= n_param * sparsity
      else:
        rhs += n_param * (1.0 - sparsity)
        raw[name] = (sum(shape) / per_layer) ** erk_power_scale
        divisor += raw[name] * n_param
    if not raw:
      break
    eps = rhs / divisor
    max_raw = max(raw.values())
    if max_raw * eps <= 1.0:
      break
    dense.update(name for name, p in raw.items() if p == max_raw)
  values = {name: (0.0 if name in dense else float(1.0 - eps * raw[name]))
            for name, _, _ in leaves}
  values.update(custom)
  return _build(params, values)


@dataclasses.dataclass(frozen=True)
class CustomMap:
  """A distribution pruning only the leaves named in ``sparsity_map`` (names or regexes).

  Hashable, so an updater holding it can be a static ``jit`` argument.
  """

  sparsity_map: tuple[tuple[str, float], ...]

  def __init__(self, sparsity_map: Mapping[str, float]):
    items = sparsity_map.items() if isinstance(sparsity_map, Mapping) else sparsity_map
    object.__setattr__(self, 'sparsity_map', tuple(sorted((str(k), v) for k, v in items)))

  def __call__(self, params: PyTree, sparsity: float | None = None) -> PyTree:
    del sparsity  # Every pruned leaf's sparsity comes from the map.
    names = [n for n, _ in named_leaves(params)]
    return _build(params, _match_custom(names, dict(self.sparsity_map)))


_BY_NAME = {'uniform': uniform, 'erk': erk}


def resolve(spec) -> Callable[..., PyTree]:
  """Turns a distribution spec (name, mapping or callable) into a callable."""
  if isinstance(spec, str):
    if spec.lower() not in _BY_NAME:
      raise ValueError(f'Unknown sparsity distribution {spec!r}; valid names are '
                       f'{sorted(_BY_NAME)}, or pass a mapping or a callable.')
    return _BY_NAME[spec.lower()]
  if isinstance(spec, Mapping):
    return CustomMap(spec)
  if callable(spec):
    return spec
  raise TypeError(f'sparsity_distribution_fn must be "uniform", "erk", a mapping from parameter '
                  f'name to sparsity or a callable, got {spec!r}.')


@dataclasses.dataclass(frozen=True)
class Partial:
  """A hashable ``functools.partial`` of a distribution (mappings are stored as tuples).

  Example: ``Partial(erk, custom_sparsity_map={'params/conv_init/kernel': 0.0})``.
  """

  fn: Callable[..., PyTree]
  kwargs: tuple[tuple[str, Any], ...]

  def __init__(self, fn, **kwargs):
    frozen = {k: tuple(sorted(v.items())) if isinstance(v, Mapping) else v
              for k, v in kwargs.items()}
    object.__setattr__(self, 'fn', resolve(fn))
    object.__setattr__(self, 'kwargs', tuple(sorted(frozen.items())))

  def __call__(self, params: PyTree, sparsity: float, **extra) -> PyTree:
    kwargs = {k: dict(v) if k == 'custom_sparsity_map' else v for k, v in self.kwargs}
    return self.fn(params, sparsity, **kwargs, **extra)


def accepts_layer_axes(dist) -> bool:
  """Whether a resolved distribution takes ``layer_axes=`` (the built-in ones do)."""
  return getattr(dist, 'fn', dist) in (uniform, erk)

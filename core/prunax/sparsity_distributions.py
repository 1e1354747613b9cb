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
import functools
import inspect
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from prunax import _checks
from prunax.tree_util import named_leaves  # noqa: F401 (re-exported)
from prunax.tree_util import path_name

PyTree = Any
FilterFn = Callable[[str, Any], bool]


class ParamName(str):
  """A parameter's ``/``-joined name; an integer index gives a path entry, as in jaxpruner.

  ``name[-1]`` is ``'kernel'`` for ``'Dense_0/kernel'`` (jaxpruner's filters index the key
  tuple of ``flax.traverse_util.flatten_dict``); slices and every other ``str`` operation
  act on the name.
  """

  def __getitem__(self, index):
    if isinstance(index, int):
      return self.split('/')[index]
    return str.__getitem__(self, index)


def _key_name(key) -> str:
  """A custom-map key as a name: tuple paths (jaxpruner's form) are ``/``-joined."""
  return '/'.join(str(k) for k in key) if isinstance(key, tuple) else str(key)


def default_filter(name: str, leaf) -> bool:
  """Prunes non-empty leaves with at least 2 dimensions (kernels, embeddings), not biases,
  scales or empty (zero-size) leaves."""
  return np.ndim(leaf) >= 2 and math.prod(np.shape(leaf)) > 0


def check_sparsity(value, name: str) -> float:
  """``value`` as a float sparsity in [0, 1); a ValueError names ``name`` otherwise."""
  return _checks.number(value, f'sparsity for {name!r}', 0.0, 1.0, high_open=True)


def _check_custom_map(custom: Any) -> dict[str, float]:
  """A custom sparsity map as a dict, its keys strings and its values sparsities."""
  if not isinstance(custom, Mapping):
    raise ValueError(
      'custom_sparsity_map must be a mapping {parameter name or regex: '
      f'sparsity}}, got {custom!r}.'
    )
  out = {}
  for key, value in custom.items():
    if isinstance(key, tuple) and key and all(isinstance(k, (str, int)) for k in key):
      key = _key_name(key)  # a path as a tuple (jaxpruner's form)
    if not isinstance(key, str):
      raise ValueError(
        f'custom sparsity map keys must be parameter names or regexes (strings), '
        f'or paths as tuples of names, got {key!r}.'
      )
    out[key] = check_sparsity(value, key)
  return out


def _match_custom(names: list[str], custom: Mapping[str, float] | None) -> dict[str, float]:
  """Resolves custom-map keys (exact names or full-match regexes) to parameter names."""
  resolved: dict[str, float] = {}
  for key, value in _check_custom_map(custom or {}).items():
    hits = matching_names(key, names)
    if not hits:
      raise ValueError(
        f'custom sparsity map key {key!r} matches no parameter; parameter names are: {names}.'
      )
    for hit in hits:
      resolved[hit] = check_sparsity(value, hit)
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
  return jax.ShapeDtypeStruct(shape[:axis] + shape[axis + 1 :], jax.numpy.result_type(leaf))


def _axes(params: PyTree, layer_axes: Mapping[str, int] | None) -> dict[str, int]:
  """``{leaf name: layer axis}`` of ``layer_axes`` given as an updater takes them (names or
  regular expressions, see :func:`prunax.layers.resolve`): a key that matches no
  parameter, or an axis out of range, is refused rather than left unused."""
  from prunax import layers  # prunax.layers imports this module

  return layers.resolve_mapping(params, layer_axes)


def _selected(
  params: PyTree, filter_fn: FilterFn | None, layer_axes: Mapping[str, int] | None = None
) -> list[tuple[str, Any]]:
  """Leaves the filter selects; a stacked leaf is judged by one layer (its slice)."""
  filter_fn = filter_fn or default_filter
  layer_axes = layer_axes or {}
  return [
    (n, leaf)
    for n, leaf in named_leaves(params)
    if filter_fn(ParamName(n), _layer_view(leaf, layer_axes.get(n)))
  ]


def uniform(
  params: PyTree,
  sparsity: float,
  filter_fn: FilterFn | None = None,
  custom_sparsity_map: Mapping[str, float] | None = None,
  layer_axes: Mapping[str, int] | None = None,
) -> PyTree:
  """The same sparsity for every selected leaf; ``custom_sparsity_map`` overrides by name.

  Args:
    params: the parameter tree (arrays or shape/dtype structs).
    sparsity: target sparsity in [0, 1) of every selected leaf.
    filter_fn: ``fn(name, leaf) -> bool`` selecting leaves to prune (default: ndim >= 2).
    custom_sparsity_map: ``{name or regex: sparsity}``; mapped leaves are pruned at their
      own sparsity whether or not the filter selects them.
    layer_axes: ``{name or regex: axis}`` of stacked leaves, as an updater takes them (see
      :mod:`prunax.layers`): the filter sees one layer, and every layer gets the sparsity.

  Returns:
    A tree like ``params`` of floats (pruned leaves) and ``None`` (dense leaves).
  """
  sparsity = check_sparsity(sparsity, 'all parameters')
  custom = _match_custom([n for n, _ in named_leaves(params)], custom_sparsity_map)
  values = {n: sparsity for n, _ in _selected(params, filter_fn, _axes(params, layer_axes))}
  values.update(custom)
  return _build(params, values)


def erk(
  params: PyTree,
  sparsity: float,
  filter_fn: FilterFn | None = None,
  custom_sparsity_map: Mapping[str, float] | None = None,
  erk_power_scale: float = 1.0,
  layer_axes: Mapping[str, int] | None = None,
) -> PyTree:
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
    layer_axes: ``{name or regex: axis}`` of stacked leaves, as an updater takes them (see
      :mod:`prunax.layers`): each layer is a leaf of the ERK budget with its own
      fan-in/fan-out (the layer axis is not a fan dimension), and all layers of a stack
      get the same sparsity.

  Returns:
    A tree like ``params`` of floats and ``None`` (dense leaves).
  """
  sparsity = check_sparsity(sparsity, 'all parameters')
  erk_power_scale = _checks.number(erk_power_scale, 'erk_power_scale', 0.0)
  layer_axes = _axes(params, layer_axes)
  custom = _match_custom([n for n, _ in named_leaves(params)], custom_sparsity_map)
  leaves = []  # (name, shape of one layer, number of layers)
  for n, x in _selected(params, filter_fn, layer_axes):
    if n in custom:
      continue
    shape, axis = tuple(np.shape(x)), layer_axes.get(n)
    if axis is None:
      leaves.append((n, shape, 1))
    else:
      leaves.append((n, shape[:axis] + shape[axis + 1 :], shape[axis]))
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
  values = {name: (0.0 if name in dense else float(1.0 - eps * raw[name])) for name, _, _ in leaves}
  values.update(custom)
  return _build(params, values)


@dataclasses.dataclass(frozen=True)
class CustomMap:
  """A distribution pruning only the leaves named in ``sparsity_map`` (names or regexes).

  Hashable, so an updater holding it can be a static ``jit`` argument.
  """

  sparsity_map: tuple[tuple[str, float], ...]

  def __init__(self, sparsity_map: Mapping[str, float]):
    items = dict(sparsity_map) if isinstance(sparsity_map, tuple) else sparsity_map
    object.__setattr__(self, 'sparsity_map', tuple(sorted(_check_custom_map(items).items())))

  def __call__(self, params: PyTree, sparsity: float | None = None) -> PyTree:
    del sparsity  # Every pruned leaf's sparsity comes from the map.
    names = [n for n, _ in named_leaves(params)]
    return _build(params, _match_custom(names, dict(self.sparsity_map)))


@dataclasses.dataclass(frozen=True)
class ParamsOnly:
  """A distribution called as ``fn(params)`` (jaxpruner's form, e.g. a ``functools.partial``
  that binds the sparsity); the updater's ``sparsity`` is not passed."""

  fn: Callable[[PyTree], PyTree]

  def __call__(self, params: PyTree, sparsity: float | None = None) -> PyTree:
    del sparsity
    return self.fn(params)


# jaxpruner's filters, taking a parameter name (see ParamName) and the leaf.
KERNEL_FILTER_FN = lambda key, param: key[-1] == 'kernel'  # noqa: E731
NOT_DIM_ONE_FILTER_FN = lambda key, param: np.ndim(param) > 1  # noqa: E731

_BY_NAME = {'uniform': uniform, 'erk': erk}


def resolve(spec) -> Callable[..., PyTree]:
  """Turns a distribution spec (name, mapping or callable) into a callable."""
  if isinstance(spec, str):
    if spec.lower() not in _BY_NAME:
      raise ValueError(
        f'Unknown sparsity distribution {spec!r}; valid names are '
        f'{sorted(_BY_NAME)}, or pass a mapping or a callable.'
      )
    return _BY_NAME[spec.lower()]
  if isinstance(spec, Mapping):
    return CustomMap(spec)
  if callable(spec):
    return spec
  raise TypeError(
    f'sparsity_distribution_fn must be "uniform", "erk", a mapping from parameter '
    f'name to sparsity or a callable, got {spec!r}.'
  )


@dataclasses.dataclass(frozen=True)
class Partial:
  """A hashable ``functools.partial`` of a distribution (mappings are stored as tuples).

  Example: ``Partial(erk, custom_sparsity_map={'params/conv_init/kernel': 0.0})``.
  """

  fn: Callable[..., PyTree]
  kwargs: tuple[tuple[str, Any], ...]

  def __init__(self, fn, **kwargs):
    fn = resolve(fn)
    try:
      inspect.signature(fn).bind_partial(None, None, **kwargs)
    except TypeError as e:
      raise TypeError(
        f'Partial: {fn!r} does not take the arguments {sorted(kwargs)}: {e}.'
      ) from None
    except ValueError:
      pass  # no signature to check (a builtin or extension callable)
    if kwargs.get('custom_sparsity_map') is not None:
      kwargs['custom_sparsity_map'] = _check_custom_map(kwargs['custom_sparsity_map'])
    if kwargs.get('filter_fn') is not None and not callable(kwargs['filter_fn']):
      raise ValueError(
        f'filter_fn must be None or a callable fn(name, leaf) -> bool, got {kwargs["filter_fn"]!r}.'
      )
    if 'erk_power_scale' in kwargs:
      kwargs['erk_power_scale'] = _checks.number(kwargs['erk_power_scale'], 'erk_power_scale', 0.0)
    frozen = {
      k: tuple(sorted(v.items())) if isinstance(v, Mapping) else v for k, v in kwargs.items()
    }
    object.__setattr__(self, 'fn', fn)
    object.__setattr__(self, 'kwargs', tuple(sorted(frozen.items())))

  def __call__(self, params: PyTree, sparsity: float, **extra) -> PyTree:
    kwargs = {k: dict(v) if k == 'custom_sparsity_map' else v for k, v in self.kwargs}
    return self.fn(params, sparsity, **kwargs, **extra)


def unwrapped(dist) -> tuple[Callable[..., PyTree], dict[str, Any]]:
  """``(function, bound keywords)`` of a distribution bound by :class:`Partial` or
  ``functools.partial`` (the form jaxpruner's configs use) or wrapped (``__wrapped__``),
  any number of times (the outermost binding of a keyword wins)."""
  bound: dict[str, Any] = {}
  while True:
    if isinstance(dist, Partial):
      bound = {**dict(dist.kwargs), **bound}
      dist = dist.fn
    elif isinstance(dist, functools.partial):
      bound = {**dist.keywords, **bound}
      dist = dist.func
    elif hasattr(dist, '__wrapped__'):
      dist = dist.__wrapped__
    else:
      return dist, bound


def accepts_layer_axes(dist) -> bool:
  """Whether a resolved distribution takes ``layer_axes=``: the built-in ones and any
  function with a ``layer_axes`` parameter do, also bound or wrapped (:func:`unwrapped`),
  unless a binding sets ``layer_axes`` itself or a wrapper's own signature has no room
  for it (a wrapper ``f(params, sparsity)`` of ``uniform`` is called as it is)."""
  fn, bound = unwrapped(dist)
  if 'layer_axes' in bound or not _takes_keyword(dist, 'layer_axes'):
    return False
  return fn in (uniform, erk) or _has_parameter(fn, 'layer_axes')


def _has_parameter(fn, name: str) -> bool:
  """Whether ``fn``'s signature names the parameter ``name`` (False without a signature)."""
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _takes_keyword(fn, name: str) -> bool:
  """Whether ``fn`` itself (not what it wraps) can be called with the keyword ``name``:
  its signature names it or takes ``**kwargs`` (True without a signature to read)."""
  try:
    parameters = inspect.signature(fn, follow_wrapped=False).parameters
  except (TypeError, ValueError):
    return True
  return name in parameters or any(
    p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
  )


def get_sparsities_erdos_renyi(
  var_shape_dict: Mapping[Any, tuple[int, ...]],
  default_sparsity: float,
  custom_sparsity_map: Mapping[Any, float] | None = None,
  include_kernel: bool = True,
  erk_power_scale: float = 1.0,
) -> dict[Any, float]:
  """ERK sparsities of named shapes (jaxpruner's function; :func:`erk` works on params).

  Args:
    var_shape_dict: ``{name: shape}`` of the variables to prune.
    default_sparsity: overall sparsity in [0, 1] of the variables not in the custom map.
    custom_sparsity_map: ``{name: sparsity}`` fixed sparsities (names not in
      ``var_shape_dict`` are ignored).
    include_kernel: score by all dimensions; if False by the last two only.
    erk_power_scale: exponent of the raw ERK probabilities.

  Returns:
    ``{name: sparsity}`` for every name of ``var_shape_dict``.
  """
  if not var_shape_dict:
    raise ValueError('Variable shape dictionary should not be empty: give {name: shape}.')
  if default_sparsity is None or not 0.0 <= default_sparsity <= 1.0:
    raise ValueError(
      f'Default sparsity should be a value between 0 and 1, got {default_sparsity!r}.'
    )
  custom = {k: v for k, v in (custom_sparsity_map or {}).items() if k in var_shape_dict}

  def raw_density(shape):
    if include_kernel:
      return (sum(shape) / math.prod(shape)) ** erk_power_scale
    n_in, n_out = shape[-2:]
    return (n_in + n_out) / (n_in * n_out)

  free = {k: tuple(s) for k, s in var_shape_dict.items() if k not in custom}
  dense: set[Any] = set()
  eps, raw = 0.0, {}
  while free:
    # jaxpruner's counts: floor(sparsity * n) zeros per variable.
    zeros = {k: math.floor(default_sparsity * math.prod(s)) for k, s in free.items()}
    rhs = sum(math.prod(s) - zeros[k] for k, s in free.items() if k not in dense)
    rhs -= sum(zeros[k] for k in free if k in dense)
    raw = {k: raw_density(s) for k, s in free.items() if k not in dense}
    if not raw:
      break
    eps = rhs / sum(raw[k] * math.prod(free[k]) for k in raw)
    top = max(raw.values())
    if top * eps <= 1.0:
      break
    dense.update(k for k, p in raw.items() if p == top)
  out = {k: 0.0 if k in dense else float(1.0 - eps * raw[k]) for k in free}
  out.update(custom)
  return {k: out[k] for k in var_shape_dict}

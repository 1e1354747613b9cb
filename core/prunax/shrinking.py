"""Structured pruning that shrinks the model: coupled channel groups found from the jaxpr.

A *group* is a set of parameter axes that must lose the same indices together: a Dense
kernel's output axis, its bias, the BatchNorm scale/bias/statistics that follow, the next
kernel's input axis, every kernel writing to or reading from the same residual stream, the
head axis of the q/k/v/out projections of an attention layer. :func:`find_groups` finds them
by tracing ``fn(params, *args)`` and following every axis through the computation
(union-find over the axes of the jaxpr's variables): elementwise ops, broadcasts,
transposes and size-preserving reshapes keep an axis; a ``dot_general`` or convolution ties
contracted axes together; a ``scan`` (a stack of layers: ``nn.scan``, ``nnx.scan``) ties
each layer's slice of a stacked leaf to its body's axes, so a group of a scanned stack loses
the same channels in every layer, and blocks the axis it loops over; an axis that is
reduced, sliced, merged by a reshape, touched by an op this module does not know, or that
is an input or output of ``fn``, *blocks* its group, and the group records the op.

Then:

* :func:`group_masks` scores each group's channels (L1, L2, Taylor ``|w * g|`` or any
  ``fn(leaf, grad)``) summed over all member leaves, and masks the lowest ones in every
  member (one-shot);
* :class:`GroupPruning` does the same inside ``wrap_optax`` on any schedule (gradual);
* :func:`shrink` removes the channels that the masks prune in every masked member, and
  returns a :class:`Shrunk` model: the same computation replayed with the new feature
  sizes (jittable, any JAX function: linen ``apply``, nnx ``split``/``merge``, plain
  functions) and its smaller params. It checks that the shrunk model computes what the
  masked model does on the example inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from prunax import selection
from prunax.base_updater import BaseUpdater

PyTree = Any

_ELEMENTWISE = frozenset(
  """
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy
copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite
le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision
rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split()
)
_REDUCTIONS = frozenset(
  """
reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
""".split()
)
_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


@dataclasses.dataclass(frozen=True)
class Group:
  """Parameter axes that share one set of channels.

  Attributes:
    size: number of channels.
    members: ``(leaf name, axis)`` pairs ('/'-joined key paths of ``params``).
    blocked_by: why the group cannot shrink (the op), or None.
  """

  size: int
  members: tuple[tuple[str, int], ...]
  blocked_by: str | None = None


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


class _Axes:
  """Union-find over (variable, axis) nodes, each class with an optional blocking reason."""

  def __init__(self):
    self.parent: dict = {}
    self.blocked: dict = {}

  def find(self, node):
    self.parent.setdefault(node, node)
    while self.parent[node] != node:
      self.parent[node] = self.parent[self.parent[node]]
      node = self.parent[node]
    return node

  def union(self, a, b):
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra
      if rb in self.blocked:
        self.blocked.setdefault(ra, self.blocked.pop(rb))

  def block(self, node, reason: str):
    self.blocked.setdefault(self.find(node), reason)


def _shape(v):
  return tuple(v.aval.shape) if hasattr(v, 'aval') else ()


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def _inner(eqn):
  for key in _CALL_PARAMS:
    inner = eqn.params.get(key)
    if inner is not None:
      return inner
  return None


def _open(jaxpr):
  return jaxpr.jaxpr if hasattr(jaxpr, 'jaxpr') else jaxpr


def _analyze(jaxpr, axes: _Axes) -> None:
  """Ties or blocks the axes of every equation of ``jaxpr`` (recursing into calls)."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [v for v in eqn.invars if _is_var(v)]
    outs = eqn.outvars
    tie = lambda a, i, b, j: axes.union((a, i), (b, j))

    def block_all(reason, ins=ins, outs=outs):
      for v in list(ins) + list(outs):
        for i in range(len(_shape(v))):
          axes.block((v, i), reason)

    inner = _inner(eqn)
    if name == 'scan':
      _analyze_scan(eqn, axes)
    elif name in _OPAQUE_CALLS:
      block_all(_OPAQUE_CALLS[name])
    elif inner is not None:
      inner_jaxpr = _open(inner)
      if len(inner_jaxpr.invars) != len(eqn.invars) or len(inner_jaxpr.outvars) != len(outs):
        block_all(name)
        continue
      for outer, inn in zip(eqn.invars, inner_jaxpr.invars):
        if _is_var(outer):
          for i in range(len(_shape(outer))):
            tie(outer, i, inn, i)
      for outer, inn in zip(outs, inner_jaxpr.outvars):
        if _is_var(inn):
          for i in range(len(_shape(outer))):
            tie(outer, i, inn, i)
      _analyze(inner_jaxpr, axes)
    elif name in _ELEMENTWISE:
      out = outs[0]
      for v in ins:  # operands of equal rank; size-1 axes broadcast
        if len(_shape(v)) == len(_shape(out)):
          for i, (a, b) in enumerate(zip(_shape(v), _shape(out))):
            if a == b:
              tie(v, i, out, i)
    elif name == 'broadcast_in_dim':
      (v,), out = ins or (None,), outs[0]
      if v is not None:
        for i, d in enumerate(eqn.params['broadcast_dimensions']):
          if _shape(v)[i] == _shape(out)[d]:
            tie(v, i, out, d)
    elif name == 'transpose':
      for k, p in enumerate(eqn.params['permutation']):
        tie(ins[0], p, outs[0], k)
    elif name == 'squeeze':
      kept = [i for i in range(len(_shape(ins[0]))) if i not in eqn.params['dimensions']]
      for k, i in enumerate(kept):
        tie(ins[0], i, outs[0], k)
    elif name == 'reshape':
      _analyze_reshape(ins[0], outs[0], axes)
    elif name in _REDUCTIONS:
      reduced = set(eqn.params['axes'])
      kept = [i for i in range(len(_shape(ins[0]))) if i not in reduced]
      for i in reduced:
        axes.block((ins[0], i), name)
      for k, i in enumerate(kept):
        tie(ins[0], i, outs[0], k)
    elif name == 'dot_general':
      (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
      lhs, rhs = eqn.invars
      if not (_is_var(lhs) and _is_var(rhs)):
        block_all(name)
        continue
      out = outs[0]
      for a, b in zip(lc, rc):
        tie(lhs, a, rhs, b)
      for k, (a, b) in enumerate(zip(lb, rb)):
        tie(lhs, a, rhs, b)
        tie(lhs, a, out, k)
      lfree = [i for i in range(len(_shape(lhs))) if i not in lc and i not in lb]
      rfree = [i for i in range(len(_shape(rhs))) if i not in rc and i not in rb]
      for k, i in enumerate(lfree):
        tie(lhs, i, out, len(lb) + k)
      for k, i in enumerate(rfree):
        tie(rhs, i, out, len(lb) + len(lfree) + k)
    elif name == 'conv_general_dilated':
      p = eqn.params
      lhs, rhs = eqn.invars
      out = outs[0]
      lspec, rspec, ospec = p['dimension_numbers']
      if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
        block_all(
          f'conv_general_dilated (feature_group_count={p["feature_group_count"]}, '
          f'batch_group_count={p["batch_group_count"]})'
        )
        continue
      tie(lhs, lspec[0], out, ospec[0])
      tie(lhs, lspec[1], rhs, rspec[1])
      tie(rhs, rspec[0], out, ospec[1])
      for spec, v in ((lspec, lhs), (rspec, rhs), (ospec, out)):
        for i in spec[2:]:
          axes.block((v, i), 'conv_general_dilated (spatial axis)')
    else:
      block_all(name)


# Calls whose body cannot be followed as a plain call (the reason an axis through them
# cannot shrink): replayed as they are (their axes are blocked, so nothing in them changes).
_OPAQUE_CALLS = {
  'shard_map': "shard_map (its body sees each device's shard, with collectives over the mesh)"
}

# Why the axis that a scan runs over (the layer axis of stacked layers) cannot shrink.
_SCANNED_AXIS = 'scan (the axis it loops over: the layers of a scanned stack)'


def _analyze_scan(eqn, axes: _Axes) -> None:
  """A ``lax.scan`` (``nn.scan``, ``nnx.scan``: a stack of layers): its body sees one slice
  of each scanned input and output, so their axis ``i + 1`` is the body's axis ``i`` (the
  scanned axis blocks); constants and carries keep their axes, and each carry's output
  feeds its input. A group of a layer's channels thus takes every layer's slice: they
  lose the same channels."""
  body = _open(eqn.params['jaxpr'])
  n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']
  tie = lambda a, i, b, j: axes.union((a, i), (b, j))
  for k, (outer, inn) in enumerate(zip(eqn.invars, body.invars, strict=True)):
    scanned = k >= n_consts + n_carry
    if not _is_var(outer):
      continue
    if scanned:
      axes.block((outer, 0), _SCANNED_AXIS)
    for i in range(len(_shape(inn))):
      tie(outer, i + scanned, inn, i)
  for k, (outer, inn) in enumerate(zip(eqn.outvars, body.outvars, strict=True)):
    scanned = k >= n_carry
    if scanned:
      axes.block((outer, 0), _SCANNED_AXIS)
    if not _is_var(inn):
      continue
    for i in range(len(_shape(inn))):
      tie(outer, i + scanned, inn, i)
      if not scanned:  # the carry's next value is the body's carry input
        tie(inn, i, body.invars[n_consts + k], i)
  _analyze(body, axes)


def _analyze_reshape(src, dst, axes: _Axes) -> None:
  """Ties axes a reshape keeps whole; blocks the ones it merges or splits."""
  a, b = _shape(src), _shape(dst)
  i = j = 0
  while i < len(a) or j < len(b):
    if i < len(a) and j < len(b) and a[i] == b[j]:
      axes.union((src, i), (dst, j))
      i, j = i + 1, j + 1
      continue
    if i < len(a) and a[i] == 1:
      i += 1
      continue
    if j < len(b) and b[j] == 1:
      j += 1
      continue
    # A chunk of axes merged or split: grow both sides until the sizes agree.
    si, sj, pa, pb = i, j, 1, 1
    while i < len(a) or j < len(b):
      if pa <= pb and i < len(a):
        pa *= a[i]
        i += 1
      elif j < len(b):
        pb *= b[j]
        j += 1
      else:
        pa *= a[i]
        i += 1
      if pa == pb:
        break
    for k in range(si, i):
      axes.block((src, k), f'reshape {a} -> {b} (merges or splits this axis)')
    for k in range(sj, j):
      axes.block((dst, k), f'reshape {a} -> {b} (merges or splits this axis)')


@dataclasses.dataclass
class _Trace:
  closed: Any
  names: list
  shapes: list
  num_params: int
  axes: _Axes
  groups: dict  # root -> Group


def _trace(fn: Callable, params: PyTree, args: tuple) -> _Trace:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  names = [_name(p) for p, _ in flat]
  closed = jax.make_jaxpr(fn)(params, *args)
  jaxpr = closed.jaxpr
  axes = _Axes()
  _analyze(jaxpr, axes)
  for v in jaxpr.invars[len(flat) :]:
    for i in range(len(_shape(v))):
      axes.block((v, i), 'an input of the function')
  for v in jaxpr.outvars:
    if _is_var(v):
      for i in range(len(_shape(v))):
        axes.block((v, i), 'an output of the function')
  members: dict = {}
  for name, v in zip(names, jaxpr.invars):
    for i, size in enumerate(_shape(v)):
      members.setdefault(axes.find((v, i)), []).append((name, i, size))
  groups = {}
  for root, mem in members.items():
    groups[root] = Group(mem[0][2], tuple((n, i) for n, i, _ in mem), axes.blocked.get(root))
  return _Trace(
    closed, names, [_shape(v) for v in jaxpr.invars[: len(flat)]], len(flat), axes, groups
  )


def _as_fn(model) -> Callable:
  if hasattr(model, 'apply') and callable(model.apply):
    return model.apply
  if callable(model):
    return model
  raise TypeError(
    f'Expected a function fn(params, *args) or a model with .apply, got {type(model).__name__}.'
  )


def find_groups(model, params: PyTree, *args, include_blocked: bool = False) -> tuple[Group, ...]:
  """The coupled channel groups of ``model(params, *args)``.

  Args:
    model: ``fn(params, *args)``, or a linen module (its ``apply`` is used).
    params: the params (or whole variables tree) the function takes first.
    *args: example inputs (only shapes and dtypes matter).
    include_blocked: also return groups that cannot shrink (with ``blocked_by`` set).

  Returns:
    Groups with more than one channel, in the order of their first member leaf.
  """
  trace = _trace(_as_fn(model), params, args)
  return tuple(
    g for g in trace.groups.values() if g.size > 1 and (include_blocked or g.blocked_by is None)
  )


SCORES: dict[str, Callable] = {
  'l1': lambda w, g: jnp.abs(w),
  'l2': lambda w, g: jnp.square(w),
  'taylor': lambda w, g: jnp.abs(w * g),
}


def _group_keep(group: Group, leaves: dict, grads: dict | None, sparsity, score) -> jax.Array:
  fn = SCORES[score] if isinstance(score, str) else score
  total = jnp.zeros(group.size, jnp.float32)
  for name, axis in group.members:
    if name not in leaves:
      continue
    w = leaves[name]
    g = None if grads is None else grads[name]
    s = fn(w, g).astype(jnp.float32)
    total = total + jnp.sum(s, axis=tuple(i for i in range(s.ndim) if i != axis))
  prune = jnp.round(jnp.asarray(sparsity, jnp.float32) * group.size).astype(jnp.int32)
  return selection.topk_mask(total, jnp.maximum(group.size - prune, 1))


def _masks_for(groups, params, grads, sparsity, score, filter_fn) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_name(p) for p, _ in flat]
  keep_leaf = {n: filter_fn(n, x) for n, (_, x) in zip(names, flat, strict=True)}
  leaves = {n: x for n, (_, x) in zip(names, flat, strict=True) if keep_leaf[n]}
  gflat = None if grads is None else dict(zip(names, jax.tree.leaves(grads), strict=True))
  masks: dict = {}
  for group in groups:
    keep = _group_keep(group, leaves, gflat, sparsity, score)
    for name, axis in group.members:
      if name not in leaves:
        continue
      shape = [1] * leaves[name].ndim
      shape[axis] = group.size
      m = jnp.broadcast_to(keep.reshape(shape), leaves[name].shape)
      masks[name] = m if name not in masks else masks[name] & m
  return treedef.unflatten([masks.get(n) for n in names])


def _default_filter(name: str, leaf) -> bool:
  return not name.startswith('batch_stats') and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def group_masks(
  groups,
  params: PyTree,
  sparsity: float,
  *,
  score: str | Callable = 'l2',
  grads: PyTree | None = None,
  filter_fn: Callable | None = None,
) -> PyTree:
  """Keep-masks pruning ``round(sparsity * size)`` channels of every group (one-shot).

  A channel's score is ``score(leaf, grad)`` summed over its slice of every member leaf
  (``'l1'``: ``|w|``, ``'l2'``: ``w**2``, ``'taylor'``: ``|w * g|`` with ``grads``; or any
  elementwise ``fn(w, g)``); the lowest channels are masked in every member, so the masked
  model computes exactly what the shrunk one will.

  Args:
    groups: from :func:`find_groups`.
    params: the tree the groups were found on.
    sparsity: fraction of each group's channels to prune (at least one channel stays).
    score: ``'l1'``, ``'l2'``, ``'taylor'`` or ``fn(w, g)``.
    grads: gradients like ``params`` (for ``'taylor'``).
    filter_fn: ``fn(name, leaf) -> bool``, the member leaves to mask and score (default:
      float leaves outside a top-level ``batch_stats`` collection).

  Returns:
    A tree like ``params``: bool masks for member leaves, None elsewhere.
  """
  if isinstance(score, str) and score not in SCORES:
    raise ValueError(
      f'Unknown score {score!r}; valid scores are {sorted(SCORES)} or a function fn(w, g).'
    )
  if score == 'taylor' and grads is None:
    raise ValueError("score='taylor' needs grads (|w * g|).")
  return _masks_for(groups, params, grads, sparsity, score, filter_fn or _default_filter)


@dataclasses.dataclass(frozen=True)
class GroupPruning(BaseUpdater):
  """Channel/head pruning of whole groups through ``wrap_optax`` (gradual or one-shot).

  Every member leaf of every group gets the scheduled sparsity; a mask update scores each
  group's channels as :func:`group_masks` does and masks the lowest in all members.

  Attributes:
    groups: from :func:`find_groups` (a tuple, so the updater stays hashable).
    score: ``'l1'``, ``'l2'`` or ``'taylor'`` (uses the step's gradients).
  """

  groups: tuple = ()
  score: str = 'l2'

  def __post_init__(self):
    super().__post_init__()
    if self.score not in SCORES:
      raise ValueError(
        f'GroupPruning: unknown score {self.score!r}; valid scores are {sorted(SCORES)}.'
      )
    if not self.groups:
      raise ValueError('GroupPruning needs groups=prunax.find_groups(...).')
    object.__setattr__(self, 'groups', tuple(self.groups))

  def target_sparsities(self, params):
    members = {name for g in self.groups for name, _ in g.members}
    return jax.tree_util.tree_map_with_path(
      lambda p, x: self.sparsity if _name(p) in members and _default_filter(_name(p), x) else None,
      params,
    )

  def warn_undeclared_stacks(self, params, targets) -> None:
    """No warning: a group's channel mask is the same in every slice of its members (every
    layer of a scanned stack, whose groups :func:`find_groups` follows through the scan),
    so each layer keeps the same count and none can be pruned to death."""
    del params, targets

  def compute_masks(self, params, sparsities, sparse_state=None, grads=None, old_masks=None):
    del old_masks
    level = next(s for s in jax.tree.leaves(sparsities) if s is not None)
    if self.score == 'taylor' and grads is None:
      grads = jax.tree.map(jnp.ones_like, params)  # no gradient yet (init): magnitude
    masks = _masks_for(self.groups, params, grads, level, self.score, _default_filter)
    return jax.tree.map(
      lambda s, m: None if s is None else m, sparsities, masks, is_leaf=lambda x: x is None
    )


# ------------------------------------------------------------------------------ shrinking


class ShrinkError(ValueError):
  """A masked channel cannot be removed (the error names the op or the group)."""


class Shrunk:
  """A shrunk model: ``shrunk(params, *args)`` replays the traced computation with the
  smaller feature sizes (jittable). ``params`` holds the smaller params; ``sizes`` maps
  each shrunk group's first member to ``(old, new)`` channel counts.

  Inputs of other shapes than the example inputs (another batch size or sequence length)
  are traced again through the original model, once per input shapes, and shrunk by the
  same kept channels."""

  def __init__(self, fn, full_params, args, trace, keep_by_member: dict, params, sizes):
    self._fn, self._keep_by_member = fn, keep_by_member
    self._full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), full_params)
    self._programs: dict = {}
    self._programs[_arg_key(args)] = self._program(trace, args)
    self.params, self.sizes = params, sizes

  def _program(self, trace: _Trace, args):
    keep_by_root = {}
    for root, group in trace.groups.items():
      kept = [self._keep_by_member[m] for m in group.members if m in self._keep_by_member]
      if kept:
        keep_by_root[root] = kept[0]
    out_tree = jax.tree.structure(jax.eval_shape(self._fn, self._full, *args))
    return trace.closed, _keep_nodes(trace, keep_by_root), out_tree

  def apply(self, params: PyTree, *args):
    """The shrunk computation of ``params`` (shaped like ``self.params``) on ``args``."""
    key = _arg_key(args)
    if key not in self._programs:
      structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
      self._programs[key] = self._program(_trace(self._fn, self._full, structs), structs)
    closed, keep, out_tree = self._programs[key]
    flat = jax.tree.leaves(params) + list(jax.tree.leaves(args))
    out = _replay(closed.jaxpr, closed.consts, flat, keep)
    return jax.tree.unflatten(out_tree, out)

  __call__ = apply


def _arg_key(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)


def _new_shape(v, keep):
  return tuple(len(keep[(v, i)]) if (v, i) in keep else d for i, d in enumerate(_shape(v)))


def _slice(x, v, keep):
  for i in range(np.ndim(x)):
    if (v, i) in keep:
      x = jnp.take(x, jnp.asarray(keep[(v, i)]), axis=i)
  return x


def _replay(jaxpr, consts, args, keep):
  env = {}
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = _slice(c, v, keep)
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    inner = _inner(eqn)
    if eqn.primitive.name == 'scan':
      outs = _replay_scan(eqn.params, invals, keep)
    elif eqn.primitive.name in _OPAQUE_CALLS:  # unchanged: bound as jax.core.eval_jaxpr does
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    elif inner is not None:
      outs = _replay(_open(inner), getattr(inner, 'consts', ()), invals, keep)
    else:
      params = dict(eqn.params)
      name = eqn.primitive.name
      if name in ('broadcast_in_dim', 'iota'):
        params['shape'] = _new_shape(eqn.outvars[0], keep)
      elif name == 'reshape':
        params['new_sizes'] = _new_shape(eqn.outvars[0], keep)
      outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _replay_scan(params: dict, invals: list, keep: dict) -> list:
  """A scan replayed with its body's new shapes (a new ``lax.scan`` of the replayed body)."""
  body = params['jaxpr']
  n_consts, n_carry = params['num_consts'], params['num_carry']
  consts, init, xs = (
    invals[:n_consts],
    invals[n_consts : n_consts + n_carry],
    invals[n_consts + n_carry :],
  )

  def step(carry, x):
    outs = _replay(_open(body), getattr(body, 'consts', ()), [*consts, *carry, *x], keep)
    return outs[:n_carry], outs[n_carry:]

  carry, ys = jax.lax.scan(
    step, init, xs, length=params['length'], reverse=params['reverse'], unroll=params['unroll']
  )
  return [*carry, *ys]


def _keep_nodes(trace: _Trace, keep_by_root: dict) -> dict:
  """(variable, axis) -> kept indices, for every node of every shrunk group."""
  return {
    node: keep_by_root[trace.axes.find(node)]
    for node in list(trace.axes.parent)
    if trace.axes.find(node) in keep_by_root
  }


def shrink(
  model, params: PyTree, masks: PyTree, *args, rtol: float = 1e-4, atol: float = 1e-5
) -> Shrunk:
  """Removes the channels pruned in every masked member of their group.

  A channel of a group goes when every member leaf that has a mask is pruned on that
  channel's whole slice (members without a mask, e.g. BatchNorm statistics, are sliced
  along). The shrunk model is checked against the masked model (``params * masks``) on
  ``args``.

  Args:
    model: ``fn(params, *args)``, or a linen module (its ``apply`` is used).
    params: the params (or whole variables tree).
    masks: keep-masks like ``params`` (None: unmasked leaf).
    *args: example inputs (traced, then used for the check).
    rtol, atol: tolerance of the check.

  Returns:
    A :class:`Shrunk` model with its smaller params.

  Raises:
    ShrinkError: a masked channel's group cannot shrink (naming the op), or the shrunk
      model differs from the masked one (the masks do not cover a whole group).

  Examples:
    Hidden channel 0 of an MLP is masked in its kernel and bias, so it goes from the
    second kernel too:

    >>> import jax, jax.numpy as jnp, prunax
    >>> def mlp(p, x):
    ...   return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2']
    >>> params = {'w1': jnp.ones((2, 4)), 'b1': jnp.zeros(4), 'w2': jnp.ones((4, 1))}
    >>> keep = jnp.array([False, True, True, True])
    >>> masks = {'w1': jnp.broadcast_to(keep, (2, 4)), 'b1': keep, 'w2': None}
    >>> shrunk = prunax.shrink(mlp, params, masks, jnp.ones((1, 2)))
    >>> jax.tree.map(jnp.shape, shrunk.params)
    {'b1': (3,), 'w1': (2, 3), 'w2': (3, 1)}
    >>> shrunk.sizes
    {('b1', 0): (4, 3)}
    >>> shrunk(shrunk.params, jnp.ones((2, 2))).tolist()  # another batch size works too
    [[6.0], [6.0]]
  """
  fn = _as_fn(model)
  trace = _trace(fn, params, args)
  flat_p, treedef = jax.tree.flatten(params)
  mask_by_name = dict(zip(trace.names, treedef.flatten_up_to(masks), strict=True))
  keep_by_root, sizes = {}, {}
  for root, group in trace.groups.items():
    masked = [(n, i) for n, i in group.members if mask_by_name.get(n) is not None]
    if not masked:
      continue
    dead = np.ones(group.size, bool)
    for name, axis in masked:
      m = np.asarray(mask_by_name[name], bool)
      dead &= ~m.any(axis=tuple(a for a in range(m.ndim) if a != axis))
    if not dead.any():
      continue
    if group.blocked_by is not None:
      raise ShrinkError(
        f'Cannot remove the {int(dead.sum())} masked channels of the group of '
        f'{group.members[0][0]!r} axis {group.members[0][1]} (size {group.size}; members '
        f'{list(group.members)}): that axis goes through {group.blocked_by}.'
      )
    kept = np.nonzero(~dead)[0]
    keep_by_root[root] = kept
    sizes[group.members[0]] = (group.size, int(kept.size))
  keep = _keep_nodes(trace, keep_by_root)
  invars = trace.closed.jaxpr.invars
  # The invars are the params' then the inputs': zip stops at the params.
  small = [_slice(x, v, keep) for x, v in zip(flat_p, invars, strict=False)]
  keep_by_member = {
    member: kept for root, kept in keep_by_root.items() for member in trace.groups[root].members
  }
  shrunk = Shrunk(
    fn, params, args, trace, keep_by_member, jax.tree.unflatten(treedef, small), sizes
  )
  masked_params = jax.tree.map(
    lambda x, m: x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype)),
    params,
    masks,
    is_leaf=lambda x: x is None,
  )
  want = jax.tree.leaves(fn(masked_params, *args))
  got = jax.tree.leaves(shrunk(shrunk.params, *args))
  for w, g in zip(want, got):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if not np.allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(np.abs(w).max(initial=0)))):
      raise ShrinkError(
        f'The shrunk model differs from the masked model (max |diff| '
        f'{float(np.abs(g - w).max()):.3g}): some removed channels are not dead in the '
        'masked model. Mask every member of a group (prunax.group_masks or '
        'GroupPruning do), including biases and norm scales.'
      )
  return shrunk


def _scaled_as(head_dim: int, attention_fn: Callable) -> Callable:
  """``attention_fn`` scaling its logits by ``1 / sqrt(head_dim)`` whatever the query's
  last dimension (a head dimension that shrinking made smaller)."""

  @functools.wraps(attention_fn)  # the same signature: flax filters keywords by it
  def attention(query, key, value, *args, **kwargs):
    depth = np.shape(query)[-1]
    if depth != head_dim:  # fn divides by sqrt(depth); the masked model by sqrt(head_dim)
      query = query * jnp.asarray(math.sqrt(depth) / math.sqrt(head_dim), query.dtype)
    return attention_fn(query, key, value, *args, **kwargs)

  attention.prunax_head_dim = head_dim
  return attention


def nnx_merge(graphdef, *states):
  """``nnx.merge(graphdef, *states)`` of shrunk state (``shrunk.params``), made to run.

  An nnx module built with the original sizes declares them in its attributes; most
  layers read their sizes from their params (``nnx.Linear``, ``nnx.Conv``, norms), but
  ``nnx.LinearGeneral`` reshapes its bias to its declared ``out_features``, and attention
  scales its logits by 1 / sqrt of the query's (now smaller) head dimension. Here every
  ``LinearGeneral`` takes its ``in_features`` and ``out_features`` from its kernel, and
  every ``MultiHeadAttention`` its ``num_heads``, ``head_dim`` and ``qkv_features`` from
  its query kernel, with an ``attention_fn`` that keeps the original scale.

  Args:
    graphdef: the module's graph definition (``nnx.split``).
    *states: the shrunk state (and any other states ``nnx.merge`` takes).

  Returns:
    The smaller module, computing what the masked module computes.
  """
  from flax import nnx

  module = nnx.merge(graphdef, *states)
  for _, layer in nnx.iter_modules(module):
    if isinstance(layer, nnx.LinearGeneral):
      # The trailing axes: a layer of a stack (nnx.vmap) holds a layer axis before them.
      shape = tuple(np.shape(layer.kernel[...]))
      n_in, n_out = len(layer.in_features), len(layer.out_features)
      layer.in_features = shape[len(shape) - n_out - n_in : len(shape) - n_out]
      layer.out_features = shape[len(shape) - n_out :]
    if isinstance(layer, nnx.MultiHeadAttention) and not hasattr(
      layer.attention_fn, 'prunax_head_dim'
    ):
      heads, head_dim = tuple(np.shape(layer.query.kernel[...]))[-2:]
      layer.attention_fn = _scaled_as(layer.head_dim, layer.attention_fn)
      layer.num_heads, layer.head_dim, layer.qkv_features = heads, head_dim, heads * head_dim
  return module


def linen_apply(module, variables: PyTree, *args, **kwargs):
  """``module.apply(variables, ...)`` of a linen module on shrunk (smaller) variables.

  A linen module fixes its layers' feature sizes in its code (``nn.Dense(64)``), so the
  smaller params of :func:`shrink` do not fit it. Here every ``nn.Dense``, ``nn.Conv``,
  ``nn.DenseGeneral`` and ``nn.Einsum`` takes its feature sizes from its kernel; every
  other layer (norms, attention, pooling) already follows its inputs' sizes. Unlike
  ``Shrunk.apply``, this runs the module's own code, so keyword arguments
  (``train=...``), RNGs and ``mutable=`` collections (e.g. BatchNorm statistics) work.

  Example::

    shrunk = prunax.shrink(model, variables, masks, x)
    y = prunax.shrinking.linen_apply(model, shrunk.params, x, train=False)
  """
  import flax.linen as nn

  def resize(next_fun, call_args, call_kwargs, context):
    layer = context.module
    if (
      context.method_name == '__call__'
      and isinstance(layer, nn.MultiHeadDotProductAttention)
      and not hasattr(layer.attention_fn, 'prunax_head_dim')
    ):
      # Its 1/sqrt(head_dim) scale is computed from the query's size, which shrinking the
      # head dimension changes: scale by the original one, as the masked model does.
      inputs_q = call_args[0] if call_args else call_kwargs['inputs_q']
      head_dim = (layer.qkv_features or np.shape(inputs_q)[-1]) // layer.num_heads
      scaled = layer.clone(parent=None, attention_fn=_scaled_as(head_dim, layer.attention_fn))
      return scaled.apply(layer.variables, *call_args, **call_kwargs)
    if context.method_name != '__call__' or not layer.has_variable('params', 'kernel'):
      return next_fun(*call_args, **call_kwargs)
    shape = tuple(np.shape(layer.get_variable('params', 'kernel')))
    if isinstance(layer, (nn.Dense, nn.Conv)):
      changes = {'features': shape[-1]}
    elif isinstance(layer, nn.DenseGeneral):
      axis = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
      batch = (layer.batch_dims,) if isinstance(layer.batch_dims, int) else layer.batch_dims
      out = shape[len(axis) + len(tuple(batch)) :]
      changes = {'features': out if isinstance(layer.features, (tuple, list)) else out[0]}
    elif isinstance(layer, nn.Einsum):
      changes = {'shape': shape}
    else:
      return next_fun(*call_args, **call_kwargs)
    if all(getattr(layer, k) == v for k, v in changes.items()):
      return next_fun(*call_args, **call_kwargs)
    resized = layer.clone(parent=None, **changes)
    return resized.apply({'params': layer.variables['params']}, *call_args, **call_kwargs)

  with nn.intercept_methods(resize):
    return module.apply(variables, *args, **kwargs)

"""Structured pruning that shrinks the model: coupled channel groups found from the jaxpr.

A *group* is a set of parameter axes that must lose the same indices together: a Dense
kernel's output axis, its bias, the BatchNorm scale/bias/statistics that follow, the next
kernel's input axis, every kernel writing to or reading from the same residual stream, the
head axis of the q/k/v/out projections of an attention layer. :func:`find_groups` finds them
by tracing ``fn(params, *args)`` and following every axis through the computation
(union-find over the axes of the jaxpr's variables): elementwise ops, broadcasts, transposes
and size-preserving reshapes keep an axis; a ``dot_general`` or convolution ties contracted
axes together; a ``scan`` (a stack of layers: ``nn.scan``, ``nnx.scan``) ties each layer's
slice of a stacked leaf to its body's axes and blocks the axis it loops over; a ``cond``
ties its operands and outputs through every branch, a ``while`` loop each carry from its
initial to its final value; random bits (dropout) take the axes of what they are combined
with; each call of a function whose traced jaxpr JAX shares between calls (``jax.nn.relu``,
a jitted function) is analyzed on its own; an axis that is reduced, sliced, merged by a
reshape, touched by an op this module does not know, or that is an input or output of
``fn``, *blocks* its group, and the group records the op.

A group of a scanned stack whose channels live inside the scan's body (an MLP's hidden
units, attention heads: every member a stacked leaf, no carry or constant of the scan
among its axes) is *per layer* (:attr:`Group.layer_axes`): each layer chooses its own
channels, as the layers of an unrolled model would, and :func:`shrink` gathers each
layer's kept channels. A group that crosses layers (the residual stream, a scan's carry)
loses the same channels in every layer.

Then:

* :func:`group_masks` scores each group's channels (L1, L2, Taylor ``|w * g|`` or any
  ``fn(leaf, grad)``) summed over all member leaves (per layer for a per-layer group), and
  masks the lowest ones in every member (one-shot);
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
shift_left shift_right_logical shift_right_arithmetic population_count clz
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
    layer_axes: for a group inside a scanned stack whose layers each choose their own
      channels, the layer axis of every member leaf (aligned with ``members``); None: one
      set of channels for every slice of the members.
  """

  size: int
  members: tuple[tuple[str, int], ...]
  blocked_by: str | None = None
  layer_axes: tuple[int, ...] | None = None


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


class _Axes:
  """Union-find over (variable, axis) nodes, each class with an optional blocking reason."""

  def __init__(self):
    self.parent: dict = {}
    self.blocked: dict = {}
    self.scope: dict = {}  # variable -> the scans (ids) whose body it is in
    self.layer_nodes: list = []  # per scan (id = index): a node of its layer axis
    self.seen: set = set()  # ids of the inner jaxprs analyzed
    self.random: list = []  # outputs of random_bits (dropout masks and the like)
    self.bodies: dict = {}  # id(eqn) (and branch) -> the renamed copy of its inner jaxpr

  def body(self, key, jaxpr):
    """The inner ``jaxpr`` of ``eqn`` to analyze: itself the first time, then a copy with
    new variables. JAX shares one traced jaxpr between the calls of a function with equal
    shapes (``jax.nn.relu`` in every layer); analyzed as one, it tied the axes of every
    call site together (all hidden layers of equal width became one group)."""
    if id(jaxpr) not in self.seen:
      self.seen.add(id(jaxpr))
      return jaxpr
    copy = self.bodies[key] = _renamed(jaxpr)
    return copy

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


def _renamed(jaxpr):
  """``jaxpr`` (open) with a new variable for each of its own (nested jaxprs are shared)."""
  new: dict = {}

  def var(v):
    if not _is_var(v):
      return v
    if v not in new:
      new[v] = jex_core.Var(v.aval)
    return new[v]

  eqns = [
    e.replace(invars=[var(v) for v in e.invars], outvars=[var(v) for v in e.outvars])
    for e in jaxpr.eqns
  ]
  return jaxpr.replace(
    constvars=[var(v) for v in jaxpr.constvars],
    invars=[var(v) for v in jaxpr.invars],
    outvars=[var(v) for v in jaxpr.outvars],
    eqns=eqns,
  )


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


def _tie_each(axes: _Axes, outer: list, inner: list) -> None:
  """Ties every axis of each variable of ``outer`` to the same axis of its ``inner``
  counterpart (literals on either side tie nothing)."""
  for a, b in zip(outer, inner, strict=True):
    if _is_var(a) and _is_var(b):
      for i in range(len(_shape(a))):
        axes.union((a, i), (b, i))


def _analyze(jaxpr, axes: _Axes, scope: tuple = ()) -> None:
  """Ties or blocks the axes of every equation of ``jaxpr`` (recursing into calls);
  ``scope``: the scans whose body ``jaxpr`` is in."""
  for v in jaxpr.invars:
    axes.scope.setdefault(v, scope)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [v for v in eqn.invars if _is_var(v)]
    outs = eqn.outvars
    for v in ins + list(outs):
      axes.scope.setdefault(v, scope)
    tie = lambda a, i, b, j: axes.union((a, i), (b, j))

    def block_all(reason, ins=ins, outs=outs):
      for v in list(ins) + list(outs):
        for i in range(len(_shape(v))):
          axes.block((v, i), reason)

    inner = _inner(eqn)
    if name == 'scan':
      _analyze_scan(eqn, axes, scope)
    elif name == 'while':
      _analyze_while(eqn, axes, scope)
    elif name == 'cond':
      # Every branch takes the operands and gives the outputs: their axes are tied.
      for k, branch in enumerate(eqn.params['branches']):
        body = axes.body((id(eqn), k), _open(branch))
        _tie_each(axes, eqn.invars[1:], body.invars)
        _tie_each(axes, outs, body.outvars)
        _analyze(body, axes, scope)
    elif name in _OPAQUE_CALLS:
      block_all(_OPAQUE_CALLS[name])
    elif inner is not None:
      inner_jaxpr = axes.body(id(eqn), _open(inner))
      if len(inner_jaxpr.invars) != len(eqn.invars) or len(inner_jaxpr.outvars) != len(outs):
        block_all(name)
        continue
      _tie_each(axes, eqn.invars, inner_jaxpr.invars)
      _tie_each(axes, outs, inner_jaxpr.outvars)
      _analyze(inner_jaxpr, axes, scope)
    elif name in _ELEMENTWISE:
      out = outs[0]
      for v in ins:  # operands of equal rank; size-1 axes broadcast
        if len(_shape(v)) == len(_shape(out)):
          for i, (a, b) in enumerate(zip(_shape(v), _shape(out))):
            if a == b:
              tie(v, i, out, i)
    elif name == 'bitcast_convert_type' and len(_shape(ins[0])) == len(_shape(outs[0])):
      for i in range(len(_shape(outs[0]))):  # equal bit widths: one element per element
        tie(ins[0], i, outs[0], i)
    elif name == 'random_bits' and not _shape(ins[0]):
      # Random numbers of a shape (dropout): their axes follow what they are combined
      # with, and a replay draws them at the new shape.
      axes.random.append(outs[0])
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


def _analyze_scan(eqn, axes: _Axes, scope: tuple) -> None:
  """A ``lax.scan`` (``nn.scan``, ``nnx.scan``: a stack of layers): its body sees one slice
  of each scanned input and output, so their axis ``i + 1`` is the body's axis ``i``; the
  scanned axes (one per scanned input and output) are one layer axis, which blocks.
  Constants and carries keep their axes, and each carry's output feeds its input. The
  body's variables are in the scan's scope (for per-layer groups, see :func:`_trace`)."""
  body = axes.body(id(eqn), _open(eqn.params['jaxpr']))
  n_consts, n_carry = eqn.params['num_consts'], eqn.params['num_carry']
  tie = lambda a, i, b, j: axes.union((a, i), (b, j))
  layer = None  # the first scanned axis: every other one is tied to it

  def scanned_axis(v):
    nonlocal layer
    axes.block((v, 0), _SCANNED_AXIS)
    if layer is None:
      layer = (v, 0)
      axes.layer_nodes.append(layer)
    tie(*layer, v, 0)

  for k, (outer, inn) in enumerate(zip(eqn.invars, body.invars, strict=True)):
    scanned = k >= n_consts + n_carry
    if not _is_var(outer):
      continue
    if scanned:
      scanned_axis(outer)
    for i in range(len(_shape(inn))):
      tie(outer, i + scanned, inn, i)
  for k, (outer, inn) in enumerate(zip(eqn.outvars, body.outvars, strict=True)):
    scanned = k >= n_carry
    if scanned:
      scanned_axis(outer)
    if not _is_var(inn):
      continue
    for i in range(len(_shape(inn))):
      tie(outer, i + scanned, inn, i)
      if not scanned:  # the carry's next value is the body's carry input
        tie(inn, i, body.invars[n_consts + k], i)
  for v in body.constvars:  # closed-over constants: the same array in every layer
    axes.scope.setdefault(v, scope)
  if layer is None:  # nothing scanned: no layer axis
    _analyze(body, axes, scope)
  else:
    _analyze(body, axes, scope + (len(axes.layer_nodes) - 1,))


def _analyze_while(eqn, axes: _Axes, scope: tuple) -> None:
  """A ``while_loop``: each carry's initial value, its value in the condition and the
  body (in and out) and its final value share their axes; constants keep theirs."""
  p = eqn.params
  n_cond, n_body = p['cond_nconsts'], p['body_nconsts']
  cond = axes.body((id(eqn), 'cond'), _open(p['cond_jaxpr']))
  body = axes.body((id(eqn), 'body'), _open(p['body_jaxpr']))
  _tie_each(axes, eqn.invars[:n_cond], cond.invars[:n_cond])
  _tie_each(axes, eqn.invars[n_cond : n_cond + n_body], body.invars[:n_body])
  carries = body.invars[n_body:]  # each carry's value in the body: the others tie to it
  _tie_each(axes, eqn.invars[n_cond + n_body :], carries)
  _tie_each(axes, cond.invars[n_cond:], carries)
  _tie_each(axes, body.outvars, carries)
  _tie_each(axes, eqn.outvars, carries)
  _analyze(cond, axes, scope)
  _analyze(body, axes, scope)


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
  layer_roots: dict  # root of a per-layer group -> root of its scan's layer axis


def _layer_axes(axes: _Axes, nodes: list, members: list) -> tuple[tuple | None, Any]:
  """The members' layer axes, and the scan's layer root, when a group is per layer.

  Per layer: every member leaf has one axis on the layer axis of the same scan, and every
  node of the group outside that scan's body is a variable with that layer axis (a stacked
  leaf, or what an op outside the scan made of it); so no carry, constant or unstacked
  leaf of the scan shares its channels, and each layer may keep its own."""
  layer_roots = {axes.find(n): scan for scan, n in enumerate(axes.layer_nodes)}

  def layer_axes_of(v, root):
    return [j for j in range(len(_shape(v))) if axes.find((v, j)) == root]

  v0, i0 = members[0][3], members[0][1]
  candidates = {axes.find((v0, j)) for j in range(len(_shape(v0))) if j != i0} & set(layer_roots)
  if len(candidates) != 1:
    return None, None
  (root,) = candidates
  out = []
  for _, _, _, v in members:
    hits = layer_axes_of(v, root)
    if len(hits) != 1:
      return None, None
    out.append(hits[0])
  scan = layer_roots[root]
  for v, _ in nodes:
    if scan not in axes.scope.get(v, ()) and not layer_axes_of(v, root):
      return None, None
  return tuple(out), root


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
      members.setdefault(axes.find((v, i)), []).append((name, i, size, v))
  nodes: dict = {}
  if axes.layer_nodes:
    for node in list(axes.parent):
      nodes.setdefault(axes.find(node), []).append(node)
  groups, layer_roots = {}, {}
  for root, mem in members.items():
    blocked, per_layer = axes.blocked.get(root), None
    if blocked is None and axes.layer_nodes:
      per_layer, layer_root = _layer_axes(axes, nodes[root], mem)
      if per_layer is not None:
        layer_roots[root] = layer_root
    groups[root] = Group(mem[0][2], tuple((n, i) for n, i, _, _ in mem), blocked, per_layer)
  shapes = [_shape(v) for v in jaxpr.invars[: len(flat)]]
  return _Trace(closed, names, shapes, len(flat), axes, groups, layer_roots)


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


def _channel_axes(group: Group, k: int) -> tuple[int, ...]:
  """The axes of member ``k`` that index the group's channels: the channel axis, after
  the layer axis of a per-layer group (its scores and masks are ``(layers, channels)``)."""
  axis = group.members[k][1]
  return (axis,) if group.layer_axes is None else (group.layer_axes[k], axis)


def _reorder(x, axes: tuple[int, ...]):
  """A ``(layers, channels)`` array ``x`` laid out in the order of a leaf's ``axes`` (a
  layer axis after the channel axis swaps them), or such a leaf's back (the same swap)."""
  return x if list(axes) == sorted(axes) else x.T


def _per_channel(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``x`` summed over every axis but ``axes``, laid out in the order of ``axes``."""
  return _reorder(jnp.sum(x, axis=tuple(i for i in range(x.ndim) if i not in axes)), axes)


def _group_keep(group: Group, leaves: dict, grads: dict | None, sparsity, score) -> jax.Array:
  """The kept channels: ``(size,)``, or ``(layers, size)`` for a per-layer group."""
  fn = SCORES[score] if isinstance(score, str) else score
  total = None
  for k, (name, _) in enumerate(group.members):
    if name not in leaves:
      continue
    w = leaves[name]
    g = None if grads is None else grads[name]
    s = _per_channel(fn(w, g).astype(jnp.float32), _channel_axes(group, k))
    total = s if total is None else total + s
  if total is None:  # no member is scored
    total = jnp.zeros(group.size, jnp.float32)
  prune = jnp.round(jnp.asarray(sparsity, jnp.float32) * group.size).astype(jnp.int32)
  keep = jnp.maximum(group.size - prune, 1)
  if total.ndim == 2:  # each layer its own channels
    return jax.vmap(lambda t: selection.topk_mask(t, keep))(total)
  return selection.topk_mask(total, keep)


def _masks_for(groups, params, grads, sparsity, score, filter_fn) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_name(p) for p, _ in flat]
  keep_leaf = {n: filter_fn(n, x) for n, (_, x) in zip(names, flat, strict=True)}
  leaves = {n: x for n, (_, x) in zip(names, flat, strict=True) if keep_leaf[n]}
  gflat = None if grads is None else dict(zip(names, jax.tree.leaves(grads), strict=True))
  masks: dict = {}
  for group in groups:
    keep = _group_keep(group, leaves, gflat, sparsity, score)
    for k, (name, _) in enumerate(group.members):
      if name not in leaves:
        continue
      axes = _channel_axes(group, k)
      keep_k = _reorder(keep, axes)
      shape = [1] * leaves[name].ndim
      for a in axes:
        shape[a] = leaves[name].shape[a]
      m = jnp.broadcast_to(keep_k.reshape(shape), leaves[name].shape)
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
  filter_fn = filter_fn or _default_filter
  return _jitted_masks_for(tuple(groups), params, grads, sparsity, score, filter_fn)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _jitted_masks_for(groups, params, grads, sparsity, score, filter_fn) -> PyTree:
  """:func:`_masks_for` as one compiled program per groups, shapes, score and filter:
  op by op, every group's channel selection ran its search loops an operation at a time
  (3.5 s for the two groups of a 784-2048-2048-10 MLP)."""
  return _masks_for(groups, params, grads, sparsity, score, filter_fn)


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
    """No warning: a group keeps the same number of channels in every slice of its members
    (every layer of a scanned stack, whose groups :func:`find_groups` follows through the
    scan; a per-layer group chooses them per layer), so none can be pruned to death."""
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
  same kept channels. Called outside a jit, it runs as one compiled program per input
  shapes (not an operation at a time)."""

  def __init__(self, fn, full_params, args, trace, keep_by_member: dict, params, sizes):
    self._fn, self._keep_by_member = fn, keep_by_member
    self._full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), full_params)
    self._programs: dict = {}
    self._programs[_arg_key(args)] = self._program(trace, args)
    self.params, self.sizes = params, sizes
    self._jitted = jax.jit(self._replayed)

  def _program(self, trace: _Trace, args):
    keep_by_root = {}
    for root, group in trace.groups.items():
      kept = [self._keep_by_member[m] for m in group.members if m in self._keep_by_member]
      if kept:
        keep_by_root[root] = kept[0]
    out_tree = jax.tree.structure(jax.eval_shape(self._fn, self._full, *args))
    return trace.closed, _keep_nodes(trace, keep_by_root), trace.axes.bodies, out_tree

  def apply(self, params: PyTree, *args):
    """The shrunk computation of ``params`` (shaped like ``self.params``) on ``args``."""
    return self._jitted(params, *args)  # inlined under a caller's jit

  def _replayed(self, params: PyTree, *args):
    key = _arg_key(args)
    if key not in self._programs:
      structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
      self._programs[key] = self._program(_trace(self._fn, self._full, structs), structs)
    closed, keep, bodies, out_tree = self._programs[key]
    flat = jax.tree.leaves(params) + list(jax.tree.leaves(args))
    out = _replay(closed.jaxpr, closed.consts, flat, keep, bodies)
    return jax.tree.unflatten(out_tree, out)

  __call__ = apply


def _arg_key(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)


def _new_shape(v, keep):
  return tuple(len(keep[(v, i)]) if (v, i) in keep else d for i, d in enumerate(_shape(v)))


@dataclasses.dataclass(frozen=True, eq=False)
class _LayerKeep:
  """The kept channels of a per-layer group on one variable: ``indices[l]`` in layer ``l``
  (its slice along ``layer_axis``; None inside the scan's body, where only the count
  matters)."""

  indices: np.ndarray  # (layers, kept)
  layer_axis: int | None

  def __len__(self) -> int:
    return self.indices.shape[1]


def _slice(x, v, keep):
  steps, indices = _slice_steps(np.ndim(x), v, keep)
  return _sliced(x, steps, indices)


def _slice_steps(ndim: int, v, keep) -> tuple[tuple, list[np.ndarray]]:
  """How :func:`_sliced` slices a value of variable ``v``: per sliced axis ``(axis,
  layer_axis)`` (static; ``layer_axis`` None for one set of channels for every layer),
  and its index array (``(kept,)``, or ``(layers, kept)``)."""
  steps, indices = [], []
  for i in range(ndim):
    kept = keep.get((v, i))
    if kept is None:
      continue
    if not isinstance(kept, _LayerKeep):
      steps.append((i, None))
      indices.append(np.asarray(kept))
      continue
    if kept.layer_axis is None:
      raise RuntimeError(f'prunax.shrink: no layer axis to slice per layer on {v} axis {i}.')
    steps.append((i, kept.layer_axis))
    indices.append(kept.indices)
  return tuple(steps), indices


def _sliced(x, steps: tuple, indices: list):
  """``x`` with the channels of :func:`_slice_steps` kept, axis by axis."""
  for (i, layer_axis), index in zip(steps, indices, strict=True):
    index = jnp.asarray(index)
    if layer_axis is None:
      x = jnp.take(x, index, axis=i, mode='clip')
      continue
    shape, full = [1] * np.ndim(x), list(np.shape(x))
    shape[layer_axis], shape[i] = full[layer_axis], index.shape[1]
    full[i] = index.shape[1]
    index = _reorder(index, (layer_axis, i)).reshape(shape)
    x = jnp.take_along_axis(x, jnp.broadcast_to(index, full), axis=i, mode='clip')
  return x


@functools.partial(jax.jit, static_argnums=0)
def _masked_and_sliced(steps: tuple, leaves: list, masks: list, indices: list):
  """The masked params (``where(mask, x, 0)``, a leaf without a mask as it is) and each
  sliced by its ``steps``: one compiled program for every leaf (op by op, each leaf's
  ``where`` and every ``take`` compiled for its shapes)."""
  masked = [
    x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))
    for x, m in zip(leaves, masks, strict=True)
  ]
  small = [_sliced(x, st, ix) for x, st, ix in zip(masked, steps, indices, strict=True)]
  return masked, small


def _replay(jaxpr, consts, args, keep, bodies):
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
      outs = _replay_scan(eqn, invals, keep, bodies)
    elif eqn.primitive.name == 'cond':
      outs = _replay_cond(eqn, invals, keep, bodies)
    elif eqn.primitive.name == 'while':
      outs = _replay_while(eqn, invals, keep, bodies)
    elif eqn.primitive.name in _OPAQUE_CALLS:  # unchanged: bound as jax.core.eval_jaxpr does
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    elif inner is not None:
      outs = _replay_body(id(eqn), inner, invals, keep, bodies)
    else:
      params = dict(eqn.params)
      name = eqn.primitive.name
      if name in ('broadcast_in_dim', 'iota', 'random_bits'):
        params['shape'] = _new_shape(eqn.outvars[0], keep)
      elif name == 'reshape':
        params['new_sizes'] = _new_shape(eqn.outvars[0], keep)
      outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _replay_body(key, closed, args: list, keep: dict, bodies: dict) -> list:
  """Replays an inner jaxpr: the copy its call site ``key`` was analyzed as, if any."""
  body = bodies.get(key, _open(closed))
  return _replay(body, getattr(closed, 'consts', ()), args, keep, bodies)


def _replay_cond(eqn, invals: list, keep: dict, bodies: dict) -> list:
  """A ``cond`` replayed as a ``lax.switch`` of its replayed branches."""

  def branch(k, closed):
    return lambda *ops: _replay_body((id(eqn), k), closed, list(ops), keep, bodies)

  branches = [branch(k, b) for k, b in enumerate(eqn.params['branches'])]
  return list(jax.lax.switch(invals[0], branches, *invals[1:]))


def _replay_while(eqn, invals: list, keep: dict, bodies: dict) -> list:
  """A ``while`` replayed as a ``lax.while_loop`` of its replayed condition and body."""
  p = eqn.params
  n_cond, n_body = p['cond_nconsts'], p['body_nconsts']
  consts = {'cond': invals[:n_cond], 'body': invals[n_cond : n_cond + n_body]}

  def run(part, carry):
    args = [*consts[part], *carry]
    return _replay_body((id(eqn), part), p[f'{part}_jaxpr'], args, keep, bodies)

  init = tuple(invals[n_cond + n_body :])
  return list(
    jax.lax.while_loop(lambda c: run('cond', c)[0], lambda c: tuple(run('body', c)), init)
  )


def _replay_scan(eqn, invals: list, keep: dict, bodies: dict) -> list:
  """A scan replayed with its body's new shapes (a new ``lax.scan`` of the replayed body)."""
  params = eqn.params
  n_consts, n_carry = params['num_consts'], params['num_carry']
  consts, init, xs = (
    invals[:n_consts],
    invals[n_consts : n_consts + n_carry],
    invals[n_consts + n_carry :],
  )

  def step(carry, x):
    outs = _replay_body(id(eqn), params['jaxpr'], [*consts, *carry, *x], keep, bodies)
    return outs[:n_carry], outs[n_carry:]

  carry, ys = jax.lax.scan(
    step, init, xs, length=params['length'], reverse=params['reverse'], unroll=params['unroll']
  )
  return [*carry, *ys]


def _keep_nodes(trace: _Trace, keep_by_root: dict) -> dict:
  """(variable, axis) -> kept indices, for every node of every shrunk group (a
  :class:`_LayerKeep` for a per-layer group's)."""
  axes, out = trace.axes, {}
  for node in list(axes.parent):
    root = axes.find(node)
    if root not in keep_by_root:
      continue
    kept = keep_by_root[root]
    if np.ndim(kept) == 2:
      v = node[0]
      on_layers = [j for j in range(len(_shape(v))) if axes.find((v, j)) == trace.layer_roots[root]]
      kept = _LayerKeep(kept, on_layers[0] if on_layers else None)
    out[node] = kept
  return out


def _dead_channels(group: Group, masked: list, mask_by_name: dict) -> np.ndarray:
  """Channels pruned in every masked member: ``(size,)``, or ``(layers, size)`` per layer."""
  dead = None
  for k, (name, _) in masked:
    m = np.asarray(mask_by_name[name], bool)
    axes = _channel_axes(group, k)
    live = _reorder(m.any(axis=tuple(a for a in range(m.ndim) if a not in axes)), axes)
    dead = ~live if dead is None else dead & ~live
  return dead


def _kept_per_layer(dead: np.ndarray) -> np.ndarray:
  """``(layers, k)`` kept channels: each layer's live ones, padded with its first dead ones
  to the largest live count (a kept dead channel computes what the masked model does)."""
  k = int((~dead).sum(axis=1).max())
  order = np.argsort(dead, axis=1, kind='stable')[:, :k]  # live channels first, in order
  return np.sort(order, axis=1)


def shrink(
  model, params: PyTree, masks: PyTree, *args, rtol: float = 1e-4, atol: float = 1e-5
) -> Shrunk:
  """Removes the channels pruned in every masked member of their group.

  A channel of a group goes when every member leaf that has a mask is pruned on that
  channel's whole slice (members without a mask, e.g. BatchNorm statistics, are sliced
  along). In a per-layer group (:attr:`Group.layer_axes`) each layer of the stack loses
  its own channels; a stack has one shape, so every layer keeps as many as the layer
  with the most live channels (the others keep some dead ones, zeros as in the masked
  model). The smaller params are sliced from the masked params (``params * masks``), and
  the shrunk model is checked against the masked model on ``args``.

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
  treedef = jax.tree.structure(params)
  mask_by_name = dict(zip(trace.names, treedef.flatten_up_to(masks), strict=True))
  keep_by_root, sizes = {}, {}
  for root, group in trace.groups.items():
    masked = [
      (k, member)
      for k, member in enumerate(group.members)
      if mask_by_name.get(member[0]) is not None
    ]
    if not masked:
      continue
    dead = _dead_channels(group, masked, mask_by_name)
    if dead.ndim == 2:  # per layer
      kept = _kept_per_layer(dead)
      if kept.shape[1] == group.size:
        continue
    else:
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
    sizes[group.members[0]] = (group.size, int(kept.shape[-1]))
  keep = _keep_nodes(trace, keep_by_root)
  # The masked params, so what stays is what the masked model holds (a per-layer stack
  # keeps some dead channels). The invars are the params' then the inputs': zip stops
  # at the params.
  leaves = treedef.flatten_up_to(params)
  plans = [
    _slice_steps(np.ndim(x), v, keep)
    for x, v in zip(leaves, trace.closed.jaxpr.invars, strict=False)
  ]
  masked, small = _masked_and_sliced(
    tuple(steps for steps, _ in plans),
    leaves,
    treedef.flatten_up_to(masks),
    [indices for _, indices in plans],
  )
  masked_params = jax.tree.unflatten(treedef, masked)
  keep_by_member = {
    member: kept for root, kept in keep_by_root.items() for member in trace.groups[root].members
  }
  shrunk = Shrunk(
    fn, params, args, trace, keep_by_member, jax.tree.unflatten(treedef, small), sizes
  )
  want = jax.tree.leaves(jax.jit(fn)(masked_params, *args))  # traceable: _trace traced it
  got = jax.tree.leaves(shrunk(shrunk.params, *args))
  for w, g in zip(want, got):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if not np.allclose(g, w, rtol=rtol, atol=atol * max(1.0, float(np.abs(w).max(initial=0)))):
      random = [v for v in trace.axes.random if any((v, i) in keep for i in range(v.aval.ndim))]
      raise ShrinkError(
        f'The shrunk model differs from the masked model (max |diff| '
        f'{float(np.abs(g - w).max()):.3g}): some removed channels are not dead in the '
        'masked model. Mask every member of a group (prunax.group_masks or '
        'GroupPruning do), including biases and norm scales.'
        + (
          f' The function also draws {len(random)} random array(s) over shrunk channels '
          '(dropout?), smaller in the shrunk model: shrink a deterministic (eval-mode) '
          'function.'
          if random
          else ''
        )
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
  from flax.core import meta  # boxed params (nn.Partitioned): their values' shapes

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
    shape = tuple(np.shape(meta.unbox(layer.get_variable('params', 'kernel'))))
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

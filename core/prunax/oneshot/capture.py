"""Finding every kernel of a model and the Gram matrix of its inputs, for any JAX model.

The model is a function ``apply_fn(params, batch)``. Its jaxpr is evaluated by a small
interpreter that tracks which values are (a slice of, or a cast of) a parameter leaf. Every
``dot_general`` with such a value on one side is a *site*: the leaf is a kernel, its
contracting dimensions are the layer's inputs and the other operand holds the layer's
input activations. This covers ``nn.Dense``, ``DenseGeneral``, ``Einsum``, attention
projections and ``nnx.Linear`` alike, without hooks into a model library.

A kernel dimension that the matmul batches over (a head axis, as in
``'bhd,hdk->bhk'``, or an expert axis) makes each of its slices a separate layer: one site
per head, with that head's own inputs. A ``conv_general_dilated`` with a parameter as its
filter is a site too (``nn.Conv``, ``nnx.Conv``): its inputs are the image patches that the
filter sees, and its input dimensions are the filter's spatial dimensions then its input
features, so that N:M groups run along input channels. Grouped convolutions
(``feature_group_count > 1``) are not sites.

Stacked (scanned) layers: a ``scan`` whose scanned inputs carry a parameter is unrolled by
the interpreter, so each layer slice ``leaf[l]`` is its own site with its own inputs. Calls
(``pjit``, ``remat``, ``custom_jvp``/``custom_vjp``) are entered; any other primitive that
reads a parameter makes that leaf a non-kernel (e.g. an embedding table read by a gather).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from prunax import sparse_inference
from prunax.sparsity_distributions import path_name

PyTree = Any

# Primitives through which a parameter passes unchanged (dtype casts and copies).
_PASS = frozenset(
  {'convert_element_type', 'copy', 'copy_p', 'reduce_precision', 'optimization_barrier'}
)


@dataclasses.dataclass(frozen=True)
class Origin:
  """A value that is ``leaves[leaf][index]`` (maybe cast)."""

  leaf: int
  index: tuple[int | None, ...] = ()


def numpy_index(index: tuple[int | None, ...]) -> tuple[int | slice, ...]:
  """A site index as a numpy index: ``None`` is a whole dimension (``:``)."""
  return tuple(slice(None) if i is None else i for i in index)


def index_name(index: tuple[int | None, ...]) -> str:
  """``'[2]'`` for layer 2 of a stacked leaf, ``'[:, 3]'`` for head 3 on dimension 1."""
  if not index:
    return ''
  return '[' + ', '.join(':' if i is None else str(i) for i in index) + ']'


@dataclasses.dataclass(frozen=True)
class Site:
  """A kernel slice used by a matmul: the unit that one-shot pruning prunes.

  Attributes:
    leaf: index of the parameter leaf (in ``jax.tree.leaves`` order).
    index: the slice of the leaf (``()`` for an ordinary kernel): the layer of a stacked
      leaf and/or the head of a kernel that a matmul batches over; ``None`` entries are
      whole dimensions (see :func:`numpy_index`).
    in_dims: the kernel slice's input (contracting) dimensions, in the order matched to
      the activations' feature dimensions.
    name: ``'params/.../kernel'`` with the slice appended (``'[3]'``, ``'[:, 1]'``).
    group: sites with the same group read the same input value (e.g. q, k, v) and are
      calibrated in the same pass.
  """

  leaf: int
  index: tuple[int, ...]
  in_dims: tuple[int, ...]
  name: str
  group: int

  @property
  def key(self) -> tuple[int, tuple[int | None, ...]]:
    return (self.leaf, self.index)

  @property
  def slices(self) -> tuple[int | slice, ...]:
    """The numpy index of the kernel slice in its leaf."""
    return numpy_index(self.index)


def _closed(j):
  return j if isinstance(j, jex_core.ClosedJaxpr) else jex_core.ClosedJaxpr(j, ())


def _call_jaxpr(eqn):
  """The inner jaxpr of a call-like equation whose inputs are the equation's inputs."""
  name = eqn.primitive.name
  if name in ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'remat2', 'checkpoint'):
    return _closed(eqn.params['jaxpr'])
  if name in ('custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr'):
    key = 'call_jaxpr' if 'call_jaxpr' in eqn.params else 'fun_jaxpr'
    return _closed(eqn.params[key])
  return None


# on_site(origin, in_dims, x, share_key, to_matrix): the kernel slice ``origin`` reads
# input value ``x`` through its input dimensions ``in_dims``; ``to_matrix()`` gives those
# inputs as ``(tokens, features)``; sites with equal ``(x, share_key)`` see the same matrix.
OnSite = Callable[[Origin, tuple, Any, Any, Callable[[], jax.Array]], None]


class _Interpreter:
  """Evaluates a jaxpr, tracking parameter origins and recording matmul and conv sites."""

  def __init__(self, on_site: OnSite):
    self.on_site = on_site
    self.non_kernel: dict[int, str] = {}  # leaf -> the first op that made it a non-kernel

  def _not_kernel(self, origins, op: str) -> None:
    for o in origins:
      if o is not None:
        self.non_kernel.setdefault(o.leaf, op)

  def run(self, closed, args, origins):
    jaxpr = closed.jaxpr
    env, orig = {}, {}

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, closed.consts):
      env[v] = c
    for v, a, o in zip(jaxpr.invars, args, origins):
      env[v] = a
      if o is not None:
        orig[v] = o
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      oin = [None if isinstance(v, jex_core.Literal) else orig.get(v) for v in eqn.invars]
      outs, oout = self.eqn(eqn, ins, oin)
      for v, x, o in zip(eqn.outvars, outs, oout):
        env[v] = x
        if o is not None:
          orig[v] = o
    return (
      [read(v) for v in jaxpr.outvars],
      [None if isinstance(v, jex_core.Literal) else orig.get(v) for v in jaxpr.outvars],
    )

  def bind(self, eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
      out = eqn.primitive.bind(*ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]

  def eqn(self, eqn, ins, oin):
    name = eqn.primitive.name
    nout = len(eqn.outvars)
    if not any(o is not None for o in oin):
      return self.bind(eqn, ins), [None] * nout
    if name in _PASS and len(ins) == 1:
      return self.bind(eqn, ins), [oin[0]]
    if name == 'dot_general':
      return self.dot_general(eqn, ins, oin), [None]
    if name == 'conv_general_dilated':
      return self.conv(eqn, ins, oin), [None]
    inner = _call_jaxpr(eqn)
    if inner is not None:
      return self.run(inner, ins, oin)
    if name == 'scan':
      return self.scan(eqn, ins, oin)
    self._not_kernel(oin, name)  # Read by something else than a matmul: not a kernel.
    return self.bind(eqn, ins), [None] * nout

  def dot_general(self, eqn, ins, oin):
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    out = self.bind(eqn, ins)
    if oin[0] is not None and oin[1] is not None:
      self._not_kernel(oin, 'dot_general of two parameters')
      return out
    k = 0 if oin[0] is not None else 1
    kernel_c, x_c = (lc, rc) if k == 0 else (rc, lc)
    kernel_b, x_b = (lb, rb) if k == 0 else (rb, lb)
    kernel_c, x_c, kernel_b, x_b = map(tuple, (kernel_c, x_c, kernel_b, x_b))
    origin, x = oin[k], ins[1 - k]
    if not kernel_b:
      self.on_site(origin, kernel_c, x, ('dot', x_c), lambda: _input_matrix(x, x_c))
      return out
    # Batched over kernel dimensions (heads): every slice is its own layer.
    kshape = np.shape(ins[k])
    for idx in np.ndindex(*(kshape[d] for d in kernel_b)):
      head = dict(zip(kernel_b, idx))
      local = tuple(head.get(d) for d in range(max(kernel_b) + 1))
      x_index = [slice(None)] * np.ndim(x)
      for d, i in zip(x_b, idx):
        x_index[d] = i
      in_dims = tuple(d - sum(b < d for b in kernel_b) for d in kernel_c)
      xc_h = tuple(d - sum(b < d for b in x_b) for d in x_c)

      def to_matrix(x_index=tuple(x_index), xc_h=xc_h):
        return _input_matrix(x[x_index], xc_h)

      self.on_site(
        Origin(origin.leaf, origin.index + local), in_dims, x, ('dot', x_c, x_b, idx), to_matrix
      )
    return out

  def conv(self, eqn, ins, oin):
    p = eqn.params
    out = self.bind(eqn, ins)
    if oin[0] is not None or p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
      why = 'conv_general_dilated' + (
        ' with a parameter as its input' if oin[0] is not None else ' with feature groups'
      )
      self._not_kernel(oin, why)
      return out
    lhs_spec, rhs_spec, _ = p['dimension_numbers']
    x, rhs = ins[0], ins[1]
    window = tuple(np.shape(rhs)[d] for d in rhs_spec[2:])
    # Patch features and the filter's matrix rows are ordered (window..., input feature),
    # so that N:M groups run along input channels.
    in_dims = (*rhs_spec[2:], rhs_spec[1])
    geometry = ('conv', window, p['window_strides'], p['padding'], p['lhs_dilation'])
    geometry += (p['rhs_dilation'], tuple(lhs_spec))

    def to_matrix():
      channels_last = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
      patches = sparse_inference.conv_patches(
        channels_last,
        window,
        p['window_strides'],
        p['padding'],
        p['lhs_dilation'],
        p['rhs_dilation'],
      )
      return patches.reshape(-1, patches.shape[-1])

    self.on_site(oin[1], in_dims, x, geometry, to_matrix)
    return out

  def scan(self, eqn, ins, oin):
    p = eqn.params
    nc, ncarry, length = p['num_consts'], p['num_carry'], p['length']
    consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
    oc, ocarry, oxs = oin[:nc], oin[nc : nc + ncarry], oin[nc + ncarry :]
    self._not_kernel(ocarry, 'scan carry')
    ys_steps = []
    steps = range(length - 1, -1, -1) if p['reverse'] else range(length)
    for i in steps:
      x_i = [x[i] for x in xs]
      o_i = [None if o is None else Origin(o.leaf, o.index + (i,)) for o in oxs]
      out, _ = self.run(p['jaxpr'], [*consts, *carry, *x_i], [*oc, *([None] * ncarry), *o_i])
      carry, ys = out[:ncarry], out[ncarry:]
      ys_steps.append(ys)
    if p['reverse']:
      ys_steps = ys_steps[::-1]
    nys = len(eqn.outvars) - ncarry
    ys = [jnp.stack([s[j] for s in ys_steps]) for j in range(nys)]
    return list(carry) + ys, [None] * len(eqn.outvars)


def _input_matrix(x, x_c: tuple[int, ...]) -> jax.Array:
  """Activations as ``(tokens, features)``: feature dims ``x_c`` last, in that order."""
  rest = [d for d in range(x.ndim) if d not in x_c]
  x = jnp.transpose(x, rest + list(x_c))
  return x.reshape(-1, math.prod(x.shape[len(rest) :]) if x_c else 1)


def _trace(apply_fn, params, batch):
  leaves, treedef = jax.tree.flatten(params)

  def flat_fn(leaves, batch):
    return apply_fn(jax.tree.unflatten(treedef, leaves), batch)

  closed = jax.make_jaxpr(flat_fn)(leaves, batch)
  return closed, leaves, treedef


def find_sites(
  apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any
) -> tuple[list[Site], set[int]]:
  """The matmul sites of ``apply_fn(params, batch)`` in execution order (shapes only).

  Returns:
    ``(sites, non_kernel)``: one :class:`Site` per kernel slice (first use), and
    ``{leaf index: op}`` for parameters read by something else than a matmul or
    convolution (``op`` names the first such primitive).
  """
  closed, leaves, treedef = _trace(apply_fn, params, batch)
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  del treedef
  sites: dict[tuple, Site] = {}
  groups: list[Any] = []
  layouts: dict[tuple, tuple] = {}

  def on_site(origin, kernel_c, x, share_key, to_matrix):
    del share_key, to_matrix
    key = (origin.leaf, origin.index)
    if key in layouts:
      if layouts[key] != kernel_c:
        raise ValueError(
          f'kernel {names[origin.leaf]!r} is used by matmuls with different '
          f'input dimensions {layouts[key]} and {kernel_c}.'
        )
      return
    layouts[key] = kernel_c
    if not groups or groups[-1] is not x:
      groups.append(x)
    name = names[origin.leaf] + index_name(origin.index)
    sites[key] = Site(origin.leaf, origin.index, kernel_c, name, len(groups) - 1)

  interp = _Interpreter(on_site)

  def run(leaves, batch):
    flat_batch = jax.tree.leaves(batch)
    interp.run(
      closed,
      [*leaves, *flat_batch],
      [Origin(i) for i in range(len(leaves))] + [None] * len(flat_batch),
    )
    return 0

  jax.eval_shape(run, leaves, batch)
  return list(sites.values()), interp.non_kernel


def make_gram_fn(
  apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any, sites: Sequence[Site]
) -> Callable[[PyTree, Any], list[jax.Array]]:
  """A jitted ``fn(params, batch) -> [sum of x^T x per site]`` (float32) and token counts.

  Only the requested sites' Gram matrices are computed, so memory is bounded by those.
  """
  closed, _, _ = _trace(apply_fn, params, batch)
  wanted = {s.key: j for j, s in enumerate(sites)}

  @jax.jit
  def gram_fn(params, batch):
    leaves = jax.tree.leaves(params)
    flat_batch = jax.tree.leaves(batch)
    grams: list[Any] = [None] * len(sites)
    counts: list[Any] = [0] * len(sites)

    shared = {}  # Kernels reading the same input (q, k, v) share one Gram matrix.

    def on_site(origin, kernel_c, x, share_key, to_matrix):
      del kernel_c
      j = wanted.get((origin.leaf, origin.index))
      if j is None:
        return
      if (id(x), share_key) not in shared:
        X = to_matrix().astype(jnp.float32)
        # x is kept so that its id stays unique.
        shared[id(x), share_key] = (x, X.T @ X, X.shape[0])
      _, g, tokens = shared[id(x), share_key]
      grams[j] = g if grams[j] is None else grams[j] + g
      counts[j] = counts[j] + tokens

    _Interpreter(on_site).run(
      closed,
      [*leaves, *flat_batch],
      [Origin(i) for i in range(len(leaves))] + [None] * len(flat_batch),
    )
    return grams, counts

  return gram_fn


def kernel_matrix(kernel: jax.Array, in_dims: tuple[int, ...]) -> jax.Array:
  """A kernel slice as a 2-D ``(in, out)`` matrix (input dims ``in_dims`` first)."""
  rest = [d for d in range(kernel.ndim) if d not in in_dims]
  moved = jnp.transpose(kernel, list(in_dims) + rest)
  return moved.reshape(math.prod(kernel.shape[d] for d in in_dims), -1)


def kernel_from_matrix(
  matrix: jax.Array, in_dims: tuple[int, ...], shape: tuple[int, ...]
) -> jax.Array:
  """Inverse of :func:`kernel_matrix`."""
  rest = [d for d in range(len(shape)) if d not in in_dims]
  perm = list(in_dims) + rest
  moved = matrix.reshape([shape[d] for d in perm])
  return jnp.transpose(moved, np.argsort(perm))

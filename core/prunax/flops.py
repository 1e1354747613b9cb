"""FLOPs accounting of sparse models, as the AutoSparse tables report it.

:class:`FlopsCounter` traces a model's apply function once (``jax.make_jaxpr``) and counts,
by shape arithmetic, the FLOPs of every contraction (``dot_general``, which covers Dense,
DenseGeneral and einsum, and ``conv_general_dilated``), naming each by the parameter leaf
that is its weight operand (through dtype casts, reshapes and transposes, and into nested
``jit``/``custom_vjp``/``remat`` calls and ``scan`` bodies, counted ``length`` times). A
multiply-add is 2 FLOPs: ``2 * output size * contracted size``. Element-wise work is not
counted, as in the papers.

With weights of density ``d`` (nonzero fraction), a contraction costs ``d`` times its dense
FLOPs. ``inference_fraction`` is the paper's "Test F". One training step
(``training_fraction``) is, per contraction of dense cost ``F`` with weight density ``d``:
the forward pass ``d F``; the input gradient ``d F`` (it multiplies by the sparse weights),
counted only if the input depends on parameters (no gradient is taken for the data); and
the weight gradient ``b F``, where ``b`` is the density of the weight gradient: the
nonzero fraction of ``backward_params`` (e.g. the backward set B of eq. 8 as a mask), or
``d`` when it is not given (gradients only for active weights). Contractions without a
parameter operand (attention scores) are dense, with a gradient per operand that depends
on parameters. :class:`TrainingFlopsAverager` averages a run's steps: the "Train F".

That is ``convention='autodiff'`` (what reverse-mode differentiation computes). The RigL
paper (Evci et al., 2020, appendix H) counts every layer's training step as 3 times its
forward pass (forward, input gradient, weight gradient), the first layer's input gradient
included; ``convention='rigl'`` counts that way (dense-weight contractions: all operands'
gradients; sparse ones: ``d F + d F + b F``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from prunax.sparsity_distributions import named_leaves

PyTree = Any

# Primitives that pass a weight through unchanged up to layout and dtype.
_PASS_THROUGH = frozenset(
  {
    'convert_element_type',
    'reshape',
    'transpose',
    'copy',
    'copy_p',
    'squeeze',
    'expand_dims',
    'broadcast_in_dim',
    'reduce_precision',
    'sharding_constraint',
  }
)
_SUBJAXPR_KEYS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')
# Training-FLOPs conventions (see the module docstring).
_CONVENTIONS = ('autodiff', 'rigl')


def _contraction_flops(eqn) -> int:
  out_size = math.prod(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs_shape = eqn.invars[0].aval.shape
    return 2 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)
  rhs_shape = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  return 2 * out_size * math.prod(rhs_shape) // rhs_shape[out_feature_dim]


class _Op:
  """A contraction: its weight leaf (index or None), dense FLOPs, and which gradients."""

  def __init__(self, weight, flops, operand_deps, weight_pos):
    self.weight = weight  # index of the parameter leaf, or None
    self.flops = flops
    self.operand_deps = operand_deps  # per operand: depends on parameters
    self.weight_pos = weight_pos  # operand position of the weight, or None


def _walk(jaxpr, env, ops, multiplier):
  """Records contractions of ``jaxpr``; ``env`` maps invars to (leaf index, depends)."""

  def read(v):
    return env.get(v, (None, False)) if isinstance(v, jex_core.Var) else (None, False)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    deps = any(d for _, d in ins)
    outs = [(None, deps)] * len(eqn.outvars)
    sub = next((eqn.params[k] for k in _SUBJAXPR_KEYS if k in eqn.params), None)
    if name in ('dot_general', 'conv_general_dilated'):
      pos = 1 if ins[1][0] is not None else (0 if ins[0][0] is not None else None)
      ops.append(
        _Op(
          None if pos is None else ins[pos][0],
          multiplier * _contraction_flops(eqn),
          [d for _, d in ins[:2]],
          pos,
        )
      )
    elif name in _PASS_THROUGH and ins:
      outs = [ins[0]]
    elif sub is not None:
      inner = sub.jaxpr if hasattr(sub, 'jaxpr') else sub
      if len(inner.invars) == len(eqn.invars):
        times = multiplier * (eqn.params['length'] if name == 'scan' else 1)
        inner_env = dict(zip(inner.invars, ins))
        _walk(inner, inner_env, ops, times)
        if name != 'scan':
          outs = [
            inner_env.get(v, (None, deps)) if isinstance(v, jex_core.Var) else (None, False)
            for v in inner.outvars
          ]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o


def _densities(tree: PyTree, n: int) -> np.ndarray:
  leaves = jax.tree.leaves(tree)
  if len(leaves) != n:
    raise ValueError(
      f'Expected a tree with {n} leaves like the params given to FlopsCounter, got {len(leaves)}.'
    )
  nonzero = jax.device_get([jnp.count_nonzero(x) for x in leaves])
  return np.array(
    [nz / max(np.size(x), 1) for nz, x in zip(nonzero, leaves, strict=True)], np.float64
  )


class FlopsCounter:
  """Dense and sparse FLOPs of a model's contractions.

  Args:
    apply_fn: ``apply_fn(params, *example_inputs)``, e.g. a Flax module's ``apply``.
    params: the parameter tree (its structure and shapes are what count).
    *example_inputs: inputs of one forward pass (arrays or ``jax.ShapeDtypeStruct``).

  Attributes:
    dense_flops: FLOPs of one dense forward pass on ``example_inputs`` (int).
    per_layer: dense forward FLOPs by parameter name (contractions without a parameter
      operand are named ``'contraction_<k>'``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from prunax.flops import FlopsCounter
    >>> counter = FlopsCounter(lambda p, x: x @ p['w'], {'w': jnp.ones((4, 3))}, jnp.ones((2, 4)))
    >>> counter.dense_flops  # 2 * batch 2 * 4 * 3, one multiply and one add each
    48
    >>> counter.inference_fraction({'w': jnp.ones((4, 3)).at[:2].set(0.0)})  # "Test F"
    0.5
  """

  def __init__(self, apply_fn: Callable[..., Any], params: PyTree, *example_inputs: Any):
    flat, treedef = jax.tree.flatten(params)
    self._names = [name for name, _ in named_leaves(params)]
    self._num_leaves = len(flat)
    closed = jax.make_jaxpr(lambda p, *xs: apply_fn(treedef.unflatten(p), *xs))(
      flat, *example_inputs
    )
    jaxpr = closed.jaxpr
    env = {v: (i, True) for i, v in enumerate(jaxpr.invars[: len(flat)])}
    self._ops: list[_Op] = []
    _walk(jaxpr, env, self._ops, 1)
    self.per_layer: dict[str, int] = {}
    unnamed = 0
    for op in self._ops:
      if op.weight is None:
        name = f'contraction_{unnamed}'
        unnamed += 1
      else:
        name = self._names[op.weight]
      self.per_layer[name] = self.per_layer.get(name, 0) + op.flops
    self.dense_flops: int = sum(op.flops for op in self._ops)

  def _density(self, densities, op):
    return 1.0 if op.weight is None else float(densities[op.weight])

  def inference_fraction(self, params: PyTree) -> float:
    """Forward FLOPs with the zeros of ``params``, as a fraction of the dense forward."""
    d = _densities(params, self._num_leaves)
    sparse = sum(op.flops * self._density(d, op) for op in self._ops)
    return sparse / self.dense_flops if self.dense_flops else 1.0

  def _training(self, params, backward_params, convention) -> tuple[float, float]:
    if convention not in _CONVENTIONS:
      raise ValueError(f'FLOPs convention must be one of {_CONVENTIONS}, got {convention!r}.')
    every_gradient = convention == 'rigl'
    d = _densities(params, self._num_leaves)
    b = d if backward_params is None else _densities(backward_params, self._num_leaves)
    sparse = dense = 0.0
    for op in self._ops:
      fwd = self._density(d, op)
      bwd = self._density(b, op)
      sparse += op.flops * fwd
      dense += op.flops
      for pos, depends in enumerate(op.operand_deps):
        if op.weight_pos is None:
          grad_density = 1.0
        elif pos == op.weight_pos:
          grad_density = bwd  # weight gradient
        else:
          grad_density = fwd  # input gradient, through the sparse weights
        if depends or pos == op.weight_pos or every_gradient:
          sparse += op.flops * grad_density
          dense += op.flops
    return sparse, dense

  def training_fraction(
    self, params: PyTree, backward_params: PyTree | None = None, convention: str = 'autodiff'
  ) -> float:
    """FLOPs of one training step (forward, input and weight gradients), as a fraction.

    Args:
      params: the weights of the forward pass (their zeros make it sparse).
      backward_params: a tree like params whose nonzeros mark the weights that receive a
        gradient (None: the nonzeros of ``params``).
      convention: 'autodiff' (input gradients only where the input depends on
        parameters) or 'rigl' (3x forward for every layer, as the RigL paper counts).

    Returns:
      Sparse over dense FLOPs of a training step.
    """
    sparse, dense = self._training(params, backward_params, convention)
    return sparse / dense if dense else 1.0


class TrainingFlopsAverager:
  """Average training-FLOPs fraction over a run (the AutoSparse tables' "Train F").

  Call :meth:`add` with the params of every step (or of evenly sampled steps).
  """

  def __init__(self, counter: FlopsCounter, convention: str = 'autodiff'):
    """Args:
    counter: the model's :class:`FlopsCounter`.
    convention: see :meth:`FlopsCounter.training_fraction`.
    """
    if convention not in _CONVENTIONS:
      raise ValueError(f'FLOPs convention must be one of {_CONVENTIONS}, got {convention!r}.')
    self.counter = counter
    self.convention = convention
    self._sum = 0.0
    self.steps = 0

  def add(self, params: PyTree, backward_params: PyTree | None = None) -> float:
    """Adds one step; returns its training-FLOPs fraction."""
    fraction = self.counter.training_fraction(params, backward_params, self.convention)
    self._sum += fraction
    self.steps += 1
    return fraction

  @property
  def fraction(self) -> float:
    """Mean training-FLOPs fraction of the added steps (1.0 before any)."""
    return self._sum / self.steps if self.steps else 1.0

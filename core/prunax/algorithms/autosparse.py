"""AutoSparse and STR: learnable per-layer thresholds with gradient annealing.

AutoSparse (Kundu et al., 2023, "AutoSparse: Towards Automated Sparse Training", sections
2-3) trains one threshold parameter ``s`` per pruned leaf. The model sees

    w_hat = sign(w) * h(|w| - T),   T = sigmoid(s),   h(x) = relu(x)        (eq. 7)

and the backward pass uses the proxy derivative ``h'(x) = 1`` for ``x > 0`` (the active
set A) and ``alpha`` for ``x <= 0`` (eq. 1), with ``alpha`` annealed by a
:class:`prunax.GradientAnnealing` schedule. So, from the gradient ``g`` at the sparse
weights (the only gradient the training loop computes):

    dL/dw = g * (1 on A, alpha elsewhere)
    dL/ds = -sigmoid'(s) * sum(g * sign(w) * (1 on A, alpha elsewhere))

which are exactly the gradients of the reparameterised forward pass with ``h`` given that
proxy derivative. The dense weights ``w`` live in ``SparseState.dense_params`` and are
updated by the wrapped optimizer; the thresholds live in ``SparseState.thresholds`` and
are updated by their own SGD with weight decay (``threshold_lr``,
``threshold_weight_decay``; decay pulls ``s`` towards 0, raising ``T``). The sparsity is
learned: the updater's ``sparsity`` only selects which leaves are pruned (through the
distribution's filter) and is otherwise unused.

With ``backward_sparsity`` (eq. 8), gradients reach only B = TopK(|w|) ∪ A, where B keeps
``1 - backward_sparsity`` of each leaf; annealing applies on B minus A.

STR (Kusupati et al., 2020, "Soft Threshold Weight Reparameterization for Learnable
Sparsity") is the ``alpha = 0`` case; its reference code also uses ``T = sigmoid(s)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import _checks
from prunax import annealing
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.base_updater import BaseUpdater
from prunax.base_updater import SparseState
from prunax.base_updater import _is_none
from prunax.base_updater import get_sparse_state
from prunax.base_updater import map_masked
from prunax.sparsity_distributions import named_leaves


def _split_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum(x)``, reduced as the two sums of ``x`` inside and outside ``mask``.

  XLA's CPU backend hands a plain float sum to a library kernel that needs its input (here
  a product of three arrays) stored in full, one array the size of the leaf; a two-output
  reduction stays in XLA's fused loop. Its loop is scalar, so rows of 16 are reduced first
  (vectorised; the two row sums take 1/8 of the leaf's fp32 bytes), then the row sums.
  """
  x = x.astype(jnp.float32).reshape(-1)
  mask = mask.reshape(-1)
  width = 16 if x.size % 16 == 0 else x.size
  x, mask = x.reshape(-1, width), mask.reshape(-1, width)
  zero = jnp.zeros_like(x)
  inside, outside = jax.lax.reduce(
    (jnp.where(mask, x, zero), jnp.where(mask, zero, x)),
    (jnp.float32(0), jnp.float32(0)),
    lambda a, b: (a[0] + b[0], a[1] + b[1]),
    (1,),
  )
  return jnp.sum(inside) + jnp.sum(outside)


def _layer_axis(s: jax.Array, w: jax.Array) -> int | None:
  """The layer axis of a stacked leaf ``w`` from its per-layer thresholds ``s`` (or None)."""
  if jnp.ndim(s) == 0 or jnp.size(s) == 1 and jnp.ndim(w) != jnp.ndim(s):
    return None
  return int(np.argmax(np.shape(s)))


def soft_threshold(w: jax.Array, s: jax.Array) -> jax.Array:
  """STR's forward pass ``sign(w) * relu(|w| - sigmoid(s))`` (in the dtype of ``w``)."""
  t = jax.nn.sigmoid(jnp.asarray(s, jnp.float32))
  return (jnp.sign(w) * jax.nn.relu(jnp.abs(w).astype(jnp.float32) - t)).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class AutoSparse(BaseUpdater):
  """Learnable-threshold sparse training with gradient annealing (AutoSparse).

  Attributes:
    sparsity: unused except to select the pruned leaves with the distribution (keep 0.0).
    alpha: gradient scale of pruned weights: a float (constant), a
      :class:`prunax.GradientAnnealing`, or a mapping of its fields (for configs).
    s_init: initial threshold parameter (paper: -5 for ResNet-50, -7 for the Transformer).
    threshold_lr: learning rate of the thresholds' SGD.
    threshold_weight_decay: weight decay of the thresholds (pulls ``s`` towards 0).
    backward_sparsity: None (every weight receives a gradient), or the fraction of each
      leaf's weights, smallest in magnitude, that receive none (eq. 8).
  """

  sparsity: float | None = 0.0
  scheduler: Any = sparsity_schedules.NoUpdateSchedule()
  alpha: Any = 0.75
  s_init: float = -5.0
  threshold_lr: float = 0.01
  threshold_weight_decay: float = 3.0517578125e-05
  backward_sparsity: float | None = None

  is_ste = True
  scheduler_kind = 'none'

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 'alpha', annealing.as_annealing(self.alpha))
    if not isinstance(self.sparsity_type, sparsity_types.Unstructured):
      raise ValueError(
        f'{type(self).__name__} learns one threshold per leaf and supports only '
        f'unstructured sparsity, got {self.sparsity_type!r}.'
      )
    name = type(self).__name__
    _checks.assign(
      self,
      s_init=_checks.number(self.s_init, f'{name} s_init'),
      threshold_lr=_checks.number(self.threshold_lr, f'{name} threshold_lr', 0.0),
      threshold_weight_decay=_checks.number(
        self.threshold_weight_decay, f'{name} threshold_weight_decay', 0.0
      ),
    )
    if self.backward_sparsity is not None:
      _checks.assign(
        self,
        backward_sparsity=_checks.number(
          self.backward_sparsity,
          f'{name} backward_sparsity (None or a sparsity)',
          0.0,
          1.0,
          high_open=True,
        ),
      )

  # ---------------------------------------------------------------------- thresholds

  def init_thresholds(self, params, targets):
    # One threshold per leaf, or per layer of a stacked leaf (shaped to broadcast).
    def init(t, p, axis):
      if t is None:
        return None
      if axis is None:
        return jnp.float32(self.s_init)
      shape = [1] * jnp.ndim(p)
      shape[axis] = jnp.shape(p)[axis]
      return jnp.full(shape, self.s_init, jnp.float32)

    return jax.tree.map(init, targets, params, self.layer_axes_tree(params), is_leaf=_is_none)

  def _s(self, sparse_state: SparseState | None, params):
    if sparse_state is None or sparse_state.thresholds is None:
      return self.init_thresholds(params, self.target_sparsities(params))
    return sparse_state.thresholds

  def compute_masks(
    self, params, sparsities, sparse_state=None, grads=None, old_masks=None, **kwargs
  ):
    """Keep-masks ``|w| > sigmoid(s)``; the sparsity emerges (``sparsities`` unused)."""
    del grads, old_masks
    s_tree = self._s(sparse_state, params)
    return jax.tree.map(
      lambda t, w, s: None if t is None else jnp.abs(w) > jax.nn.sigmoid(s).astype(w.dtype),
      sparsities,
      params,
      s_tree,
      is_leaf=_is_none,
    )

  def forward_params(self, dense, masks, sparse_state):
    return map_masked(
      lambda m, w, s: jnp.where(m, soft_threshold(w, s), 0).astype(w.dtype),
      masks,
      dense,
      sparse_state.thresholds,
    )

  # ------------------------------------------------------------------ proxy gradients

  def _proxy_scale(self, dense, masks, sparse_state):
    """Per-weight proxy derivative of ``h``: 1 on A, alpha on B minus A, 0 outside B."""
    alpha = self.alpha(sparse_state.count)

    def scale(m, w, s):
      out = jnp.where(m, 1.0, alpha)
      if self.backward_sparsity is not None:
        in_b = self.leaf_mask(jnp.abs(w), self.backward_sparsity, _layer_axis(s, w)) | m
        out = jnp.where(in_b, out, 0.0)
      return out

    return map_masked(scale, masks, dense, sparse_state.thresholds)

  def transform_gradients(self, grads, dense, masks, sparse_state):
    scales = self._proxy_scale(dense, masks, sparse_state)
    return map_masked(lambda m, g, c: (g * c).astype(g.dtype), masks, grads, scales)

  def threshold_gradients(self, grads, dense, masks, sparse_state):
    """``dL/ds`` per pruned leaf, from the gradients at the sparse weights."""
    scales = self._proxy_scale(dense, masks, sparse_state)

    def grad_s(m, g, w, c, s):
      s = jnp.asarray(s, jnp.float32)
      dt_ds = jax.nn.sigmoid(s) * (1.0 - jax.nn.sigmoid(s))
      x = g.astype(jnp.float32) * jnp.sign(w).astype(jnp.float32) * c
      if jnp.ndim(s) == 0:
        return -dt_ds * _split_sum(x, m)
      # Per-layer thresholds of a stacked leaf: one sum per layer.
      axis = _layer_axis(s, w)
      return -dt_ds * selection.map_layers(_split_sum, axis, x, m).reshape(s.shape)

    return map_masked(grad_s, masks, grads, dense, scales, sparse_state.thresholds)

  def update_thresholds(self, grads, dense, masks, sparse_state):
    # ``dense``: the weights the forward pass of this step used.
    ds = self.threshold_gradients(grads, dense, masks, sparse_state)

    def step(m, s, g):
      # A non-finite gradient (one NaN/inf gradient of the leaf) skips the update: a NaN
      # threshold would prune the whole leaf for good.
      return jnp.where(
        jnp.isfinite(g), s - self.threshold_lr * (g + self.threshold_weight_decay * s), s
      )

    return map_masked(step, masks, sparse_state.thresholds, ds)


@dataclasses.dataclass(frozen=True)
class STR(AutoSparse):
  """Soft Threshold Reparameterization: AutoSparse with ``alpha = 0`` (no gradient to
  pruned weights)."""

  alpha: Any = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.alpha.alpha0 != 0.0:
      raise ValueError(
        f'STR is AutoSparse with alpha = 0, got alpha={self.alpha!r}; use '
        'AutoSparse for gradient annealing.'
      )


def summarize_thresholds(opt_state: Any) -> dict[str, float]:
  """Learned thresholds of an AutoSparse/STR optimizer state.

  Args:
    opt_state: an optimizer state containing a :class:`prunax.SparseState`.

  Returns:
    ``{'threshold/<param name>': sigmoid(s), 's/<param name>': s}`` for every pruned leaf.
  """
  thresholds = get_sparse_state(opt_state).thresholds
  if thresholds is None or isinstance(thresholds, optax.MaskedNode):
    raise ValueError(
      'This optimizer state has no learned thresholds; it was not built by AutoSparse or STR.'
    )
  out: dict[str, float] = {}
  for name, s in named_leaves(thresholds):
    s = float(jax.device_get(s))
    out[f'threshold/{name}'] = float(jax.nn.sigmoid(s))
    out[f's/{name}'] = s
  return out

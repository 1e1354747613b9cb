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
proxy derivative. The algorithm's state (:class:`AutoSparseState`) holds the dense
weights ``w``, updated by the wrapped optimizer, and the thresholds, which,
as in the STR reference code (where ``s`` is a layer parameter in the optimizer with its
own weight decay, ``st_decay``), are trained by the wrapped optimizer too, with its
learning rate and schedule, from the gradient ``dL/ds + threshold_weight_decay * s`` (decay
pulls ``s`` towards 0, raising ``T``), with their own optimizer state. The optimizer sees
them as a tree of their own, shaped like the params with ``optax.MaskedNode()`` at leaves
that are not pruned (as ``optax.masked`` gives its inner transformation), so a
transformation over the whole tree (``clip_by_global_norm``) takes the thresholds' norm
apart from the weights', and one that labels or masks the params by tree applies to each
leaf's threshold as to the leaf.
``threshold_lr`` (a float) trains them with their own plain SGD instead (prunax's earlier
behaviour, with 0.01). The sparsity is learned: the updater's ``sparsity`` only selects
which leaves are pruned (through the distribution's filter) and is otherwise unused.

The default ``alpha`` is the paper's annealing (section 5.1: Sigmoid-Cosine decay, eq. 4,
from ``alpha0 = 0.75``) over ``training_steps``; without ``training_steps`` it stays at 0.75,
the paper's fixed-scale baseline.

With ``backward_sparsity`` (eq. 8), gradients reach only B = TopK(|w|) ∪ A, where B keeps
``1 - backward_sparsity`` of each leaf; annealing applies on B minus A.

STR (Kusupati et al., 2020, "Soft Threshold Weight Reparameterization for Learnable
Sparsity") is the ``alpha = 0`` case; its reference code also uses ``T = sigmoid(s)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import _checks
from prunax import _xla_workarounds
from prunax import annealing
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax.algorithms.ste import StraightThrough
from prunax.base_updater import BaseUpdater
from prunax.state import SparseState
from prunax.state import get_sparse_state
from prunax.tree_util import from_stored
from prunax.tree_util import is_none
from prunax.tree_util import map_masked
from prunax.tree_util import named_leaves
from prunax.tree_util import to_stored


def _layer_axis(s: jax.Array, w: jax.Array) -> int | None:
  """The layer axis of a stacked leaf ``w`` from its per-layer thresholds ``s`` (or None)."""
  if jnp.ndim(s) == 0 or jnp.size(s) == 1 and jnp.ndim(w) != jnp.ndim(s):
    return None
  return int(np.argmax(np.shape(s)))


def soft_threshold(w: jax.Array, s: jax.Array) -> jax.Array:
  """STR's forward pass ``sign(w) * relu(|w| - sigmoid(s))`` (in the dtype of ``w``)."""
  t = jax.nn.sigmoid(jnp.asarray(s, jnp.float32))
  return (jnp.sign(w) * jax.nn.relu(jnp.abs(w).astype(jnp.float32) - t)).astype(w.dtype)


class AutoSparseState(NamedTuple):
  """AutoSparse's state (``MaskedNode()`` at leaves that are not pruned).

  Attributes:
    dense_params: the dense weights of the pruned leaves.
    thresholds: the threshold parameter ``s`` of every pruned leaf (float32; per layer of
      a stacked leaf, shaped to broadcast against it).
    threshold_state: the wrapped optimizer's state for the thresholds (``MaskedNode()``
      with ``threshold_lr``).
  """

  dense_params: Any
  thresholds: Any
  threshold_state: Any

  params_like = ('dense_params',)


@dataclasses.dataclass(frozen=True)
class AutoSparse(StraightThrough, BaseUpdater):
  """Learnable-threshold sparse training with gradient annealing (AutoSparse).

  Attributes:
    sparsity: unused except to select the pruned leaves with the distribution (keep 0.0).
    alpha: gradient scale of pruned weights: a float (constant), a
      :class:`prunax.GradientAnnealing`, a mapping of its fields (for configs), or None:
      the paper's Sigmoid-Cosine decay from 0.75 over ``training_steps`` (constant 0.75
      without them); see :meth:`alpha_schedule`.
    training_steps: length of the training in optimizer steps, over which the default
      ``alpha`` anneals (None: not known).
    s_init: initial threshold parameter (paper: -5 for ResNet-50, -7 for the Transformer).
    threshold_lr: None: the thresholds are trained by the wrapped optimizer, as the
      weights are; a float: by their own plain SGD with this learning rate (prunax's
      earlier behaviour, whose default was 0.01).
    threshold_weight_decay: weight decay of the thresholds, added to their gradient
      (``dL/ds + decay * s``; pulls ``s`` towards 0). The default is the paper's and STR's.
      A decay of the wrapped optimizer itself (``optax.adamw``, ``add_decayed_weights``)
      reaches the thresholds too, unless its mask leaves them out.
    backward_sparsity: None (every weight receives a gradient), or the fraction of each
      leaf's weights, smallest in magnitude, that receive none (eq. 8).
  """

  sparsity: float | None = 0.0
  scheduler: Any = sparsity_schedules.NoUpdateSchedule()
  alpha: Any = None
  training_steps: int | None = None
  s_init: float = -5.0
  threshold_lr: float | None = None
  threshold_weight_decay: float = 3.0517578125e-05
  backward_sparsity: float | None = None

  # The paper's alpha0 for ResNet-50 (section 5.1, Table 1), annealed by Sigmoid-Cosine.
  default_alpha0 = 0.75

  def __post_init__(self):
    super().__post_init__()
    if self.alpha is not None:
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
      threshold_weight_decay=_checks.number(
        self.threshold_weight_decay, f'{name} threshold_weight_decay', 0.0
      ),
    )
    if self.threshold_lr is not None:
      _checks.assign(
        self,
        threshold_lr=_checks.number(
          self.threshold_lr, f'{name} threshold_lr (None or a learning rate)', 0.0
        ),
      )
    if self.training_steps is not None:
      _checks.assign(
        self,
        training_steps=_checks.integer(
          self.training_steps, f'{name} training_steps (None or a number of steps)', 1
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

  def alpha_schedule(self) -> annealing.GradientAnnealing:
    """The schedule of alpha: ``alpha`` if given, else the paper's default.

    The paper's runs (section 5.1) anneal alpha by Sigmoid-Cosine decay (eq. 4) over the
    whole training from ``alpha0 = 0.75`` (ResNet-50, Table 1): here over
    ``training_steps``, one period per step. Without ``training_steps`` alpha stays 0.75.
    """
    if self.alpha is not None:
      return self.alpha
    if self.training_steps is None:
      return annealing.GradientAnnealing('constant', alpha0=self.default_alpha0)
    return annealing.GradientAnnealing(
      'sigmoid_cosine', alpha0=self.default_alpha0, decay_steps=self.training_steps
    )

  # ---------------------------------------------------------------------- thresholds

  def init_algorithm_state(self, params, masks, targets):
    dense = super().init_algorithm_state(params, masks, targets).dense_params
    return AutoSparseState(
      dense, to_stored(self.init_thresholds(params, targets)), optax.MaskedNode()
    )

  def init_thresholds(self, params, targets):
    """Initial thresholds ``s_init``: one per pruned leaf, or per layer of a stacked leaf
    (shaped to broadcast against it); None for leaves that are not pruned."""

    def init(t, p, axis):
      if t is None:
        return None
      if axis is None:
        return jnp.float32(self.s_init)
      shape = [1] * jnp.ndim(p)
      shape[axis] = jnp.shape(p)[axis]
      return jnp.full(shape, self.s_init, jnp.float32)

    return jax.tree.map(init, targets, params, self.layer_axes_tree(params), is_leaf=is_none)

  def _s(self, sparse_state: SparseState | None, params):
    if sparse_state is None:
      return self.init_thresholds(params, self.target_sparsities(params))
    return _thresholds(sparse_state)

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
      is_leaf=is_none,
    )

  def forward_params(self, dense, masks, sparse_state):
    return map_masked(
      lambda m, w, s: jnp.where(m, soft_threshold(w, s), 0).astype(w.dtype),
      masks,
      dense,
      _thresholds(sparse_state),
    )

  # ------------------------------------------------------------------ proxy gradients

  def _proxy_scale(self, dense, masks, sparse_state):
    """Per-weight proxy derivative of ``h``: 1 on A, alpha on B minus A, 0 outside B."""
    alpha = self.alpha_schedule()(sparse_state.count)

    def scale(m, w, s, *top):
      out = jnp.where(m, 1.0, alpha)
      return jnp.where(top[0] | m, out, 0.0) if top else out

    trees = (dense, _thresholds(sparse_state))
    if self.backward_sparsity is not None:  # B = TopK(|w|) of every leaf, one selection
      axes = map_masked(lambda m, w, s: _layer_axis(s, w), masks, *trees)
      trees += (self.magnitude_masks(masks, dense, self.backward_sparsity, axes),)
    return map_masked(scale, masks, *trees)

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
        return -dt_ds * _xla_workarounds.fused_sum(x)
      # Per-layer thresholds of a stacked leaf: one sum per layer.
      axis = _layer_axis(s, w)
      sums = selection.map_layers(_xla_workarounds.fused_sum, axis, x)
      return -dt_ds * sums.reshape(s.shape)

    return map_masked(grad_s, masks, grads, dense, scales, _thresholds(sparse_state))

  def init_with_optimizer(self, algorithm_state, inner, params):
    thresholds = from_stored(algorithm_state.thresholds)
    if self.threshold_lr is not None or thresholds is None:
      return algorithm_state
    return algorithm_state._replace(
      threshold_state=inner.init(_threshold_params(thresholds, params))
    )

  def before_update(self, algorithm_state, grads, dense, masks, sparse_state, inner):
    """The thresholds' step, from the dense weights the forward pass used."""
    thresholds, threshold_state = self.update_thresholds(grads, dense, masks, sparse_state, inner)
    if thresholds is not None:
      # The optimizer's pass runs after the thresholds' reductions have read the old dense
      # weights, so XLA updates those in place instead of copying them.
      grads = _xla_workarounds.after(grads, thresholds)
    state = algorithm_state._replace(thresholds=to_stored(thresholds))
    if threshold_state is not None:
      state = state._replace(threshold_state=threshold_state)
    return state, grads

  def update_thresholds(self, grads, dense, masks, sparse_state, inner):
    """New thresholds (None at leaves that are not pruned) and their optimizer state
    after a step: ``dense`` are the weights the forward pass of this step used."""
    s_tree = _thresholds(sparse_state)
    # With weight decay (STR's ``st_decay``), added to the gradient as torch's SGD does.
    ds = map_masked(
      lambda m, g, s: g + self.threshold_weight_decay * s,
      masks,
      self.threshold_gradients(grads, dense, masks, sparse_state),
      s_tree,
    )
    ds = _threshold_params(s_tree, dense, ds)  # None-free from here: a tree like params
    if self.threshold_lr is not None:  # Their own plain SGD.

      def step(m, s, g):
        # A non-finite gradient (one NaN/inf gradient of the leaf) skips the update: a NaN
        # threshold would prune the whole leaf for good.
        return jnp.where(jnp.isfinite(g), s - self.threshold_lr * g, s)

      return map_masked(step, masks, s_tree, ds), None
    # The wrapped optimizer, on a tree like the params: a leaf's threshold where it is
    # pruned, MaskedNode() elsewhere, so that transformations that label or mask the params
    # by a tree (multi_transform, masked) apply to the thresholds too. A 0-d zero there
    # (until 2026-12) cost every unpruned leaf an optimizer state and its kernels.
    old_state = sparse_state.algorithm_state.threshold_state
    updates, opt_state = inner.update(ds, old_state, _threshold_params(s_tree, dense))
    new = jax.tree.map(
      lambda s, u: None if s is None else s + u.astype(s.dtype), s_tree, updates, is_leaf=is_none
    )
    # A non-finite gradient (one NaN/inf gradient of a pruned leaf) skips the thresholds'
    # step, state included: a NaN threshold would prune the whole leaf for good.
    # Read from one vector of every threshold gradient: XLA fuses nothing into a
    # concatenation of more than 8 operands, where a flag per leaf and-ed together was one
    # fusion of every leaf's gradient, which its fusion pass builds in time quadratic in
    # the leaves (892 ms of a 256-layer step's compile, 443 ms so; the limit:
    # _xla_workarounds.FUSED_CONCAT_OPERANDS).
    every = [jnp.reshape(g, (-1,)) for g in jax.tree.leaves(ds)] or [jnp.zeros(0)]
    finite = _xla_workarounds.shared_flag(jnp.all(jnp.isfinite(jnp.concatenate(every))))
    keep = lambda a, b: jnp.where(finite, a, b).astype(jnp.result_type(b))
    new = jax.tree.map(lambda a, b: None if b is None else keep(a, b), new, s_tree, is_leaf=is_none)
    opt_state = jax.tree.map(keep, opt_state, old_state)
    return new, opt_state


def _thresholds(sparse_state: SparseState) -> Any:
  """The thresholds of ``sparse_state`` (None at leaves that are not pruned)."""
  return from_stored(sparse_state.algorithm_state.thresholds)


def _threshold_params(s_tree: Any, params: Any, values: Any = None) -> Any:
  """A tree like ``params``: at the pruned leaves (those where ``s_tree``, the thresholds,
  is not None) the leaf of ``values`` (default: ``s_tree``), elsewhere ``MaskedNode()``."""
  return jax.tree.map(
    lambda s, p, v: optax.MaskedNode() if s is None else v,
    s_tree,
    params,
    s_tree if values is None else values,
    is_leaf=is_none,
  )


@dataclasses.dataclass(frozen=True)
class STR(AutoSparse):
  """Soft Threshold Reparameterization: AutoSparse with ``alpha = 0`` (no gradient to
  pruned weights)."""

  alpha: Any = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.alpha is None or self.alpha.alpha0 != 0.0:
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
  algorithm_state = get_sparse_state(opt_state).algorithm_state
  thresholds = getattr(algorithm_state, 'thresholds', None)
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

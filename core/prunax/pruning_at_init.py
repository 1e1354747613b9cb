"""Pruning at initialisation (PaI): SNIP, GraSP and SynFlow masks, then static training.

Masks are computed once, before training (Sparseland handbook, section 3.8: PaI is the
main family of static sparse training), from scores of the initial weights ``w``:

* SNIP (Lee et al., 2019): keep the largest ``|g * w|``, ``g`` the loss gradient on a batch.
* GraSP (Wang et al., 2020): score ``-w * Hg`` (Hessian-gradient product, computed as the
  ``jax.jvp`` of ``jax.grad``); the highest scores are removed, preserving gradient flow.
  The reference implementations divide the logits by a temperature ``T = 200`` in the loss
  of ``Hg``; ``loss_fn`` is used as given, so include the temperature there to match them
  (:func:`grasp_scores`).
* SynFlow (Tanaka et al., 2020), data-free: with all parameters replaced by ``|w| * mask``
  and an all-ones input, ``R = sum(model output)``, score ``|dR/dw * w|``; pruned over
  ``iterations`` rounds to the densities ``(1 - sparsity) ** (k / iterations)``, which
  avoids layer collapse. Deep networks, whose flow overflows float32, are scored on a
  model rescaled layer by layer by powers of two, which keeps the ranking (see
  :func:`synflow_scores`).

By default the three prune globally (one threshold over all pruned leaves, as in their
papers); pass ``sparsity_distribution_fn`` for per-leaf sparsities. Training then proceeds
as static sparse training: ``FixedMaskSparse(masks).wrap_optax(opt)``, or the updaters
:class:`SNIP`, :class:`GraSP` and :class:`SynFlow`, which compute the masks in ``init``
from the params given to it (their loss function and batch, or model and input shape, are
fields), so they also work through :func:`prunax.create_updater_from_config` with
``extra={'loss_fn': ..., 'batch': ...}`` or ``extra={'apply_fn': ..., 'input_shape': ...}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import _checks
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import strategies
from prunax.algorithms.pruners import GlobalMagnitudePruning
from prunax.algorithms.pruners import MagnitudePruning
from prunax.base_updater import BaseUpdater
from prunax.base_updater import static_jittable
from prunax.tree_util import is_none
from prunax.tree_util import map_masked

PyTree = Any


# --------------------------------------------------------------------------- scores


def snip_scores(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any) -> PyTree:
  """SNIP connection sensitivity ``|g * w|`` with ``g = grad(loss_fn)(params, batch)``."""
  grads = jax.grad(loss_fn)(params, batch)
  return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, params)


def grasp_scores(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any) -> PyTree:
  """GraSP scores ``-w * Hg`` (the largest are removed).

  ``g`` and ``H`` are those of ``loss_fn`` as given. The GraSP reference code computes
  them on the cross-entropy of ``logits / T`` with ``T = 200``; to reproduce it, build
  ``loss_fn`` with that temperature (e.g. ``cross_entropy(apply(p, x) / 200.0, y)``).
  """
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  g = grad_fn(params)
  _, hg = jax.jvp(grad_fn, (params,), (g,))
  return jax.tree.map(lambda w, h: -w * h, params, hg)


def _flow_scale_exponent(w: jax.Array) -> jax.Array:
  """``k`` with ``2**k`` near a leaf's gain per layer on a positive input.

  The gain is the mean sum of ``|w|`` over the input axis (-2): a Dense kernel's mean
  column sum, also per layer for stacked (scanned) kernels ``(layers, in, out)``; a
  convolution's window adds a factor of its size. 0 for 1-D leaves (biases) and leaves
  without weight.
  """
  if jnp.ndim(w) < 2:
    return jnp.int32(0)
  gain = jnp.sum(w.astype(jnp.float32)) / max(w.size // w.shape[-2], 1)
  ok = jnp.isfinite(gain) & (gain > 0)
  return jnp.where(ok, jnp.round(jnp.log2(jnp.where(ok, gain, 1.0))), 0).astype(jnp.int32)


def synflow_scores(
  apply_fn: Callable[..., jax.Array],
  params: PyTree,
  input_shape: tuple[int, ...],
  masks: PyTree | None = None,
) -> PyTree:
  """SynFlow scores ``|dR/dw * w|`` of the linearised model ``|w| * mask`` on ones.

  ``R`` is a product over the layers, so in deep networks it leaves the float range
  (a 40-layer, 256-wide MLP gives ``inf`` for every score in float32). When the direct
  scores are not all finite, or ``R`` underflows to 0, the scores are computed on a
  rescaled model instead: every leaf of two or more dimensions is divided by a power of two
  near its gain (:func:`_flow_scale_exponent`), exactly, so that each layer keeps the flow
  near 1. For a network whose output is homogeneous in each layer's weights (no biases,
  or zero biases as at initialisation) this multiplies every score by the same factor, so
  the ranking, within and across leaves, is the paper's; otherwise (nonzero biases) the
  biases' share of the flow changes. The returned scores are those of the rescaled model
  in that case (only their order matters).
  """

  def flow(abs_params):
    out = apply_fn(abs_params, jnp.ones(input_shape, jnp.float32))
    return jnp.sum(out)

  def scores_of(abs_params):
    r, grads = jax.value_and_grad(flow)(abs_params)
    return r, jax.tree.map(lambda g, w: jnp.abs(g * w), grads, abs_params)

  abs_params = jax.tree.map(jnp.abs, params)
  if masks is not None:
    abs_params = map_masked(lambda m, w: jnp.where(m, w, 0), masks, abs_params)
  r, direct = scores_of(abs_params)
  # ldexp by an integer exponent is exact: the rescaled scores carry no extra rounding.
  _, rescaled = scores_of(
    jax.tree.map(lambda w: jnp.ldexp(w, -_flow_scale_exponent(w)).astype(w.dtype), abs_params)
  )
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in jax.tree.leaves(direct)]))
  use_direct = finite & jnp.isfinite(r) & (r > 0)
  return jax.tree.map(lambda d, x: jnp.where(use_direct, d, x), direct, rescaled)


# ---------------------------------------------------------------------------- masks


def _selector(
  params: PyTree, sparsity: float, sparsity_distribution_fn, layer_axes
) -> tuple[BaseUpdater, PyTree]:
  """The updater that selects the masks, and its target sparsities of ``params``. With a
  per-leaf distribution, a stacked leaf is pruned layer by layer where ``layer_axes`` (or
  the flax boxes) say it is stacked, and an undeclared one that looks stacked is warned
  about, as ``wrap_optax`` does."""
  if sparsity_distribution_fn is None:
    selector = GlobalMagnitudePruning(sparsity=sparsity, layer_axes=layer_axes)
    return selector, selector.target_sparsities(params)
  selector = MagnitudePruning(
    sparsity=sparsity, sparsity_distribution_fn=sparsity_distribution_fn, layer_axes=layer_axes
  )
  targets = selector.target_sparsities(params)
  selector.warn_undeclared_stacks(params, targets)
  return selector, targets


# The sparsity of the selector that masks_from_scores compiles (any valid one).
_ANY_SPARSITY = 0.5


def masks_from_scores(
  params: PyTree,
  scores: PyTree,
  sparsity: float,
  sparsity_distribution_fn: Any = None,
  *,
  layer_axes: Any = None,
) -> PyTree:
  """Boolean keep-masks keeping the highest scores (None for leaves that are not pruned).

  Args:
    params: the weights (their shapes and names select the pruned leaves).
    scores: a tree like params; higher is kept.
    sparsity: target sparsity in [0, 1).
    sparsity_distribution_fn: None for one global threshold, else a distribution as
      accepted by :class:`prunax.BaseUpdater` (``'uniform'``, ``'erk'``, ...).
    layer_axes: ``{parameter name or regex: axis}`` of stacked (scanned) parameters, each
      of whose layers a per-leaf distribution prunes on its own (as
      :class:`prunax.BaseUpdater`'s ``layer_axes``).
  """
  selector, targets = _selector(params, sparsity, sparsity_distribution_fn, layer_axes)
  # One program for any sparsity: the selector's own sparsity only sets which leaves its
  # distribution prunes and pools, the same at every value, and the targets are traced.
  # Run eagerly, the selection compiled each of its operations: the benchmark transformer
  # LM's masks took 16 s, then 2.5 s at another sparsity; jitted, 5 s, then 0.08 s. An
  # updater that cannot be a static argument (a ``layer_axes`` dict), or scores that are
  # not arrays, still run eagerly.
  static = dataclasses.replace(selector, sparsity=_ANY_SPARSITY)
  if not static_jittable(static, scores):
    return selector.masks_from_scores(scores, targets)
  return _jitted_masks(static, scores, jax.tree.map(np.float32, targets))


@jax.jit(static_argnums=0)
def _jitted_masks(selector: BaseUpdater, scores: PyTree, targets: PyTree) -> PyTree:
  """``selector.masks_from_scores(scores, targets)``, jitted with traced targets."""
  return selector.masks_from_scores(scores, targets)


def snip(
  loss_fn: Callable[[PyTree, Any], jax.Array],
  params: PyTree,
  batch: Any,
  sparsity: float,
  sparsity_distribution_fn: Any = None,
  *,
  layer_axes: Any = None,
) -> PyTree:
  """SNIP keep-masks (bool, None for leaves not pruned); ``loss_fn(params, batch)``.
  ``layer_axes``: see :func:`masks_from_scores`."""
  scores = snip_scores(loss_fn, params, batch)
  return masks_from_scores(
    params, scores, sparsity, sparsity_distribution_fn, layer_axes=layer_axes
  )


def grasp(
  loss_fn: Callable[[PyTree, Any], jax.Array],
  params: PyTree,
  batch: Any,
  sparsity: float,
  sparsity_distribution_fn: Any = None,
  *,
  layer_axes: Any = None,
) -> PyTree:
  """GraSP keep-masks: the weights of largest ``-w * Hg`` are removed. ``layer_axes``: see
  :func:`masks_from_scores`."""
  scores = jax.tree.map(jnp.negative, grasp_scores(loss_fn, params, batch))
  return masks_from_scores(
    params, scores, sparsity, sparsity_distribution_fn, layer_axes=layer_axes
  )


def synflow(
  apply_fn: Callable[..., jax.Array],
  params: PyTree,
  input_shape: tuple[int, ...],
  sparsity: float,
  iterations: int = 100,
  sparsity_distribution_fn: Any = None,
  *,
  layer_axes: Any = None,
) -> PyTree:
  """SynFlow keep-masks, pruned iteratively without data.

  Args:
    apply_fn: ``apply_fn(params, x)`` of the model (its normalisation layers should be in
      inference mode).
    params: the initial weights.
    input_shape: shape of the all-ones input, batch dimension included (e.g. ``(1, 784)``).
    sparsity: final sparsity in [0, 1).
    iterations: pruning rounds (paper: 100); round ``k`` keeps ``(1 - sparsity) ** (k / n)``.
    sparsity_distribution_fn: None (global) or a per-leaf distribution.
    layer_axes: see :func:`masks_from_scores`.

  Returns:
    Boolean keep-masks, None for leaves that are not pruned.
  """
  iterations = _checks.integer(iterations, 'synflow iterations', 1)
  selector, targets = _selector(params, sparsity, sparsity_distribution_fn, layer_axes)
  masks = jax.tree.map(
    lambda t, p: None if t is None else jnp.ones(jnp.shape(p), bool),
    targets,
    params,
    is_leaf=is_none,
  )

  @jax.jit
  def step(masks, fraction):
    scores = synflow_scores(apply_fn, params, input_shape, masks)
    scores = map_masked(lambda m, s: jnp.where(m, s, -1.0), masks, scores)
    now = jax.tree.map(
      lambda t: None if t is None else 1.0 - (1.0 - t) ** fraction, targets, is_leaf=is_none
    )
    return selector.masks_from_scores(scores, now)

  for k in range(1, iterations + 1):
    masks = step(masks, jnp.float32(k / iterations))
  return masks


# -------------------------------------------------------------------------- training


class Hashed:
  """A pytree of arrays (masks, a batch) wrapped to be hashable by its content."""

  def __init__(self, tree: PyTree):
    leaves, self.treedef = jax.tree.flatten(tree, is_leaf=is_none)
    self.leaves = tuple(None if x is None else np.asarray(x) for x in leaves)
    digest = hashlib.sha256(str(self.treedef).encode())
    for x in self.leaves:
      digest.update(
        b'none'
        if x is None
        else str((x.shape, x.dtype)).encode() + np.ascontiguousarray(x).tobytes()
      )
    self.digest = digest.hexdigest()

  @property
  def tree(self) -> PyTree:
    return self.treedef.unflatten(list(self.leaves))

  def __hash__(self):
    return hash(self.digest)

  def __eq__(self, other):
    return isinstance(other, Hashed) and self.digest == other.digest

  def __repr__(self):
    return f'Hashed({self.digest[:12]})'


def _hashed(value):
  return value if isinstance(value, Hashed) or value is None else Hashed(value)


@dataclasses.dataclass(frozen=True)
class _StaticFromInit(BaseUpdater):
  """Static sparse training on masks computed once, in ``init``, from the params."""

  scheduler: Any = sparsity_schedules.NoUpdateSchedule()

  def compute_init_masks(self, params: PyTree) -> PyTree:
    raise NotImplementedError

  def init_masks(self, params, targets):
    masks = self.compute_init_masks(params)
    return jax.tree.map(
      lambda t, m: None if t is None else jnp.asarray(m, bool), targets, masks, is_leaf=is_none
    )

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    # Traced in the engine's (never taken) mask-update branch; the masks never change.
    return jax.tree.map(jnp.abs, params)

  def instant_sparsify(self, params, grads=None):
    masks = self.init_masks(params, self.target_sparsities(params))
    sparse = map_masked(lambda m, p: jnp.where(m, p, 0).astype(p.dtype), masks, params)
    return sparse, masks


@dataclasses.dataclass(frozen=True)
class FixedMaskSparse(_StaticFromInit):
  """Static sparse training on given masks (from PaI, a lottery ticket, a checkpoint).

  Attributes:
    masks: a tree like params of bool/uint8 keep-masks, None for dense leaves (stored
      hashed by content, so the updater stays a valid static ``jit`` argument).
  """

  masks: Any = None
  sparsity: float | None = 0.0

  def __post_init__(self):
    if self.masks is None:
      raise ValueError(
        'FixedMaskSparse needs masks: a tree like params of keep-masks, None '
        'for leaves that are not pruned.'
      )
    object.__setattr__(self, 'masks', _hashed(self.masks))
    super().__post_init__()

  def _masks_like(self, params):
    """The masks in the tree structure of ``params``, matched by parameter name (so masks
    saved as plain dicts fit params held in a FrozenDict, as t5x holds them)."""
    masks = self.masks.tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
      return treedef.unflatten(treedef.flatten_up_to(masks))
    except (ValueError, TypeError):
      pass
    by_name = dict(sparsity_distributions.named_leaves(masks, is_leaf=is_none))
    names = [sparsity_distributions.path_name(path) for path, _ in flat]
    missing = sorted(set(names) - set(by_name))
    extra = sorted(set(by_name) - set(names))
    if missing or extra:
      raise ValueError(
        'FixedMaskSparse: the masks do not name the same parameters as params: '
        f'no mask for {missing[:5]}, masks of no parameter {extra[:5]}. Give a tree '
        'like params (None for a leaf that is not pruned).'
      )
    return treedef.unflatten([by_name[n] for n in names])

  def target_sparsities(self, params):
    masks = self._masks_like(params)

    def sparsity(m, p):
      if m is None:
        return None
      if np.shape(m) != np.shape(p):
        raise ValueError(
          f'FixedMaskSparse: a mask of shape {np.shape(m)} does not match its '
          f'parameter of shape {np.shape(p)}.'
        )
      return 1.0 - float(np.count_nonzero(m)) / max(np.size(m), 1)

    return jax.tree.map(sparsity, masks, params, is_leaf=is_none)

  def compute_init_masks(self, params):
    return self._masks_like(params)


@dataclasses.dataclass(frozen=True)
class SNIP(_StaticFromInit):
  """SNIP at ``init`` (global), then static sparse training.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    batch: the batch of the scores (stored hashed by content).
  """

  loss_fn: Callable[..., Any] | None = None
  batch: Any = None
  selection_strategy = strategies.GlobalThreshold()

  def __post_init__(self):
    if self.loss_fn is None or self.batch is None:
      raise ValueError(
        f'{type(self).__name__} needs loss_fn and batch (config: extra='
        '{"loss_fn": ..., "batch": ...}).'
      )
    object.__setattr__(self, 'batch', _hashed(self.batch))
    super().__post_init__()

  def compute_init_masks(self, params):
    return snip(self.loss_fn, params, self.batch.tree, self.sparsity)


@dataclasses.dataclass(frozen=True)
class GraSP(SNIP):
  """GraSP at ``init`` (global), then static sparse training."""

  def compute_init_masks(self, params):
    return grasp(self.loss_fn, params, self.batch.tree, self.sparsity)


@dataclasses.dataclass(frozen=True)
class SynFlow(_StaticFromInit):
  """SynFlow at ``init`` (global, data-free), then static sparse training.

  Attributes:
    apply_fn: ``apply_fn(params, x)`` of the model.
    input_shape: shape of the all-ones input, with its batch dimension.
    iterations: pruning rounds.
  """

  apply_fn: Callable[..., Any] | None = None
  input_shape: tuple[int, ...] | None = None
  iterations: int = 100
  selection_strategy = strategies.GlobalThreshold()

  def __post_init__(self):
    if self.apply_fn is None or self.input_shape is None:
      raise ValueError(
        'SynFlow needs apply_fn and input_shape (config: extra={"apply_fn": '
        '..., "input_shape": (1, ...)}).'
      )
    shape = tuple(self.input_shape) if isinstance(self.input_shape, (tuple, list)) else None
    if not shape or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape
    ):
      raise ValueError(
        'SynFlow input_shape must be a tuple of positive integers (batch '
        f'dimension included, e.g. (1, 784)), got {self.input_shape!r}.'
      )
    _checks.assign(
      self, input_shape=shape, iterations=_checks.integer(self.iterations, 'SynFlow iterations', 1)
    )
    super().__post_init__()

  def compute_init_masks(self, params):
    return synflow(self.apply_fn, params, self.input_shape, self.sparsity, self.iterations)

"""Dense-to-sparse pruning: magnitude, random, saliency, and their global variants.

Gradual pruning (Zhu & Gupta, 2017) with ``PolynomialSchedule``, or one-shot with
``OneShotSchedule``. On a mask-update step the scores are taken on the weights the
model saw in this step, before its optimizer update (and on this step's gradients); the
update is then applied to the weights that stay.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prunax import selection
from prunax import sparsity_types
from prunax import strategies
from prunax.base_updater import BaseUpdater


def _unless_zero(p, score):
  return jnp.where(p == 0, -1.0, score)


def _abs_product(p, g):
  return jnp.abs(p * g)


def _require_grads(grads, name: str):
  if grads is None:
    raise ValueError(f'{name} scores weights by |w * g| and needs gradients: pass grads=...')
  return grads


@dataclasses.dataclass(frozen=True)
class NoPruning(BaseUpdater):
  """The dense baseline: the wrapped optimizer runs unchanged and nothing is masked."""

  sparsity: float | None = 0.0

  def target_sparsities(self, params):
    return jax.tree.map(lambda _: None, params)

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    return params


@dataclasses.dataclass(frozen=True)
class MagnitudePruning(BaseUpdater):
  """Keeps the largest-magnitude weights: score ``|w|``.

  Examples:
    One-shot pruning to 50% at the first step (the 1-D leaves of a model, biases and
    norms, are left dense by the default distribution):

    >>> import jax.numpy as jnp, optax, prunax
    >>> pruner = prunax.MagnitudePruning(
    ...   sparsity=0.5, scheduler=prunax.sparsity_schedules.OneShotSchedule(target_step=0)
    ... )
    >>> params = {'w': jnp.array([[0.1, -2.0], [3.0, -0.4]]), 'b': jnp.ones(2)}
    >>> tx = pruner.wrap_optax(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> prunax.bool_masks(state, params)['w'].tolist()
    [[False, True], [True, False]]
    >>> (params['w'] == 0).tolist()
    [[True, False], [False, True]]
  """

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    # Lazy scores: |w| is recomputed in every selection pass, never stored.
    return jax.tree.map(lambda p: selection.Lazy(jnp.abs, p), params)


@dataclasses.dataclass(frozen=True)
class RandomPruning(BaseUpdater):
  """Keeps random weights (scores from the state's RNG key, new every update).

  Unstructured masks keep the top of random keys that never tie
  (:func:`prunax.selection.hash_keys`, uniform), so their search starts where the
  threshold is expected and breaks no tie; other structures score uniform floats. Either
  way weights already pruned (exactly 0) score lowest, so gradual random pruning only
  removes more.
  """

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    key = self.rng_key(sparse_state, salt=2)
    if sparsity_types.is_plain_unstructured(self.sparsity_type):
      keys = self.random_keys(params, key)
      return jax.tree.map(lambda s, p: selection.Lazy(selection.zeros_lowest, p, s), keys, params)
    scores = self.random_scores(params, key)
    return jax.tree.map(lambda s, p: selection.Lazy(_unless_zero, p, s), scores, params)


@dataclasses.dataclass(frozen=True)
class SaliencyPruning(BaseUpdater):
  """Keeps the weights of largest first-order saliency: score ``|w * g|``."""

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    grads = _require_grads(grads, type(self).__name__)
    return jax.tree.map(lambda p, g: selection.Lazy(_abs_product, p, g), params, grads)


@dataclasses.dataclass(frozen=True)
class GlobalMagnitudePruning(MagnitudePruning):
  """Magnitude pruning with one threshold over all pruned leaves (target is the total)."""

  selection_strategy = strategies.GlobalThreshold()


@dataclasses.dataclass(frozen=True)
class GlobalSaliencyPruning(SaliencyPruning):
  """Saliency pruning with one threshold over all pruned leaves."""

  selection_strategy = strategies.GlobalThreshold()

"""t5x's ``OptaxWrapper`` for pruned transformations (imports t5x)."""

from __future__ import annotations

from typing import Any

import gin
import jax
from flax import serialization
from flax.core import frozen_dict
from t5x import optimizers

from prunax_t5x.partitioning import sparse_state_logical_axes


@gin.configurable(module='prunax_t5x')
class PrunedOptaxWrapper(optimizers.OptaxWrapper):
  """``t5x.optimizers.OptaxWrapper`` whose optax state may hold ``prunax.SparseState``.

  Training is t5x's own; only :meth:`derive_logical_axes`, the hook t5x's partitioner calls
  for every optimizer, is extended: ``SparseState`` nodes get the params' axes for their
  masks and dense weights, and every other optax state keeps t5x's own rules. Nothing in
  t5x is modified. In gin::

    OPTIMIZER = @prunax_t5x.PrunedOptaxWrapper()
    prunax_t5x.PrunedOptaxWrapper.optax_optimizer = @prunax_t5x.pruned_optax()
  """

  def derive_logical_axes(self, optimizer: optimizers.Optimizer,
                          param_logical_axes: Any) -> optimizers.Optimizer:
    """Like ``OptaxWrapper.derive_logical_axes``, also for pruned optimizer states."""
    axes = jax.tree.map(lambda _: None, optimizer.state_dict())
    axes['target'] = param_logical_axes
    state_axes = sparse_state_logical_axes(
        optimizer.state.param_states, param_logical_axes,
        optimizers.OptaxStatePartitionRules.derive_optax_logical_axes)
    axes['state']['param_states'] = serialization.to_state_dict(state_axes)
    return optimizer.restore_state(frozen_dict.unfreeze(axes))

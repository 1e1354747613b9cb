"""Sparsity in t5x's train summaries: a ``WeightMetricsComputer`` for t5x's ``Trainer``.

t5x's ``Trainer`` takes a ``weight_metrics_computer``; its ``compute_metrics`` runs inside
the partitioned train step after every update and its metrics are summarised by t5x like the
loss (averaged over the steps since the previous summary and written to TensorBoard at every
summary step). :class:`SparsityMetrics` reports:

- ``sparsity/total``: the fraction of zeros over all params with at least two dimensions;
- ``sparsity/<param name>``: the same for each of those params (``<param name>`` as t5x names
  them, e.g. ``decoder/layers_0/mlp/wi_0/kernel``);
- ``sparsity/scheduled_total``: the sparsity the pruner's schedule prescribes after this
  step over the same params (for gradual pruning it rises from 0 to the target; for
  AutoSparse, which learns its sparsity, it is the configured sparsity).

Bind it in gin (``pruning.gin`` does)::

  trainer.Trainer.weight_metrics_computer = @prunax_t5x.SparsityMetrics()
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from t5x import metrics as metrics_lib
from t5x import trainer
from t5x import utils

import prunax
from prunax import sparsity_types


def updater_of(optax_optimizer: Any) -> prunax.BaseUpdater | None:
  """The prunax updater of a transformation built by ``updater.wrap_optax``, else None."""
  return prunax.engines.updater_of(optax_optimizer)


def _average(value: jax.Array) -> metrics_lib.AveragePerStep:
  return metrics_lib.AveragePerStep.from_model_output(jnp.asarray(value, jnp.float32))


@gin.configurable(module='prunax_t5x')
class SparsityMetrics(trainer.WeightMetricsComputer):
  """t5x's weight metrics plus the params' sparsity (total, per param, scheduled).

  Args:
    weight_metrics: also compute t5x's own weight metrics (``weight_rms``,
      ``weight_gradient_rms``...), as a plain ``trainer.WeightMetricsComputer`` would.
  """

  def __init__(self, weight_metrics: bool = False):
    self.weight_metrics = weight_metrics

  def compute_metrics(
    self, gradients: Any, old_train_state: Any, new_train_state: Any
  ) -> dict[str, Any]:
    metrics = (
      super().compute_metrics(gradients, old_train_state, new_train_state)
      if self.weight_metrics
      else {}
    )
    params = new_train_state.params
    flat = {
      name: leaf
      for name, leaf in utils.flatten_dict_string_keys(params).items()
      if jnp.ndim(leaf) >= 2
    }
    zeros = {name: jnp.sum(leaf == 0) for name, leaf in flat.items()}
    size = sum(leaf.size for leaf in flat.values())
    for name, leaf in flat.items():
      metrics[f'sparsity/{name}'] = _average(zeros[name] / leaf.size)
    metrics['sparsity/total'] = _average(sum(zeros.values()) / max(size, 1))
    scheduled = self._scheduled_zeros(new_train_state, params)
    if scheduled is not None:
      metrics['sparsity/scheduled_total'] = _average(scheduled / max(size, 1))
    return metrics

  @staticmethod
  def _scheduled_zeros(train_state: Any, params: Any) -> jax.Array | None:
    optimizer = getattr(train_state, '_optimizer', None)
    optimizer_def = getattr(optimizer, 'optimizer_def', None)
    updater = updater_of(getattr(optimizer_def, 'optax_optimizer', None))
    if updater is None or updater.scheduler is None:
      return None
    count = prunax.get_sparse_state(train_state.param_states).count
    targets = jax.tree.leaves(updater.target_sparsities(params), is_leaf=lambda x: x is None)
    total = jnp.zeros((), jnp.int32)
    for target, leaf in zip(targets, jax.tree.leaves(params), strict=True):
      if target is not None:
        total = total + sparsity_types.num_zeros(
          updater.scheduler.sparsity(count - 1, jnp.float32(target)), leaf.size
        )
    return total

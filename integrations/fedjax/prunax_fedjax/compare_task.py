"""The ``federated_digits`` task of ``prunax compare`` (entry point ``prunax.compare_tasks``).

FedAvg on non-IID federated digits with a pruned server optimizer: see
:mod:`prunax_fedjax.examples.federated_digits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

import prunax
from prunax.compare.tasks import Observer
from prunax.compare.tasks import TrainResult


@dataclasses.dataclass(eq=False)
class FederatedDigitsTask:
  """FedAvg on non-IID federated digits with a pruned server optimizer (FedJAX).

  One training step is one federated round (one server optimizer update), so the
  comparison's updater (its algorithm, sparsity, distribution, sparsity type, schedule and
  ``algorithm_overrides``) is used as it is. Runs through
  ``prunax_fedjax.examples.federated_digits.run_one``.

  Attributes:
    clients_per_round: clients sampled each round (out of 50).
    name: task name in reports.
    metric_name: name of the metric in reports.
  """

  clients_per_round: int = 10
  name: str = 'federated_digits'
  metric_name: str = 'accuracy'

  def example_params(self) -> Any:
    """The initial params of the task's model (seed 0)."""
    from prunax_fedjax.examples import federated_digits

    return federated_digits.create_model().init(jax.random.PRNGKey(0))

  def run(
    self,
    updater: prunax.BaseUpdater,
    seed: int,
    steps: int,
    observe: Observer,
    observe_every: int,
  ) -> TrainResult:
    """Runs ``steps`` federated rounds with ``updater`` pruning the server model."""
    from prunax_fedjax.examples import federated_digits

    del observe, observe_every  # The example's loop reports only the end of training.
    out = federated_digits.run_one(
      type(updater).__name__,  # Only reported: the pruner is used as it is.
      seed=seed,
      num_rounds=steps,
      pruner=updater,
      clients_per_round=self.clients_per_round,
    )
    return TrainResult(
      metric=out['final_accuracy'],
      sparsity=out['final_sparsity'],
      seconds_per_step=out['seconds'] / max(steps, 1),
    )


def federated_digits_task(**kwargs: Any) -> FederatedDigitsTask:
  """The task factory declared as ``federated_digits`` in ``prunax.compare_tasks``.

  Args:
    **kwargs: the config's ``task_args``, fields of :class:`FederatedDigitsTask`.

  Returns:
    The task.
  """
  return FederatedDigitsTask(**kwargs)

"""The ``cartpole`` task of ``prunax compare`` (entry point ``prunax.compare_tasks``).

DQN on CartPole through Dopamine's own runner (:func:`prunax_dopamine.run.run`), with the
pruned agent of this package.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import prunax
from prunax.compare.tasks import Observer
from prunax.compare.tasks import TrainResult
from prunax.compare.tasks import scale_schedule


@dataclasses.dataclass(eq=False)
class CartPoleTask:
  """DQN on CartPole through Dopamine's own runner, with the pruned agent of prunax_dopamine.

  One step is one Dopamine iteration of ``training_steps`` agent steps, i.e.
  ``training_steps // update_period`` optimizer updates (``update_period`` 4 in
  ``dqn_cartpole.gin``): the comparison's updater is used as it is, its schedule scaled
  from iterations to optimizer updates. The metric is the last iteration's average
  training return.

  Attributes:
    training_steps: agent steps per iteration (one comparison step).
    update_period: agent steps per optimizer update.
    name: task name in reports.
    metric_name: name of the metric in reports.
  """

  training_steps: int = 500
  update_period: int = 4
  name: str = 'cartpole'
  metric_name: str = 'return'

  def example_params(self) -> None:
    """None: the agent builds its network inside Dopamine's runner."""
    return None

  def agent_updater(self, updater: prunax.BaseUpdater) -> prunax.BaseUpdater:
    """The updater the agent gets: ``updater`` with its schedule in optimizer updates."""
    return scale_schedule(updater, max(1, self.training_steps // self.update_period))

  def run(
    self,
    updater: prunax.BaseUpdater,
    seed: int,
    steps: int,
    observe: Observer,
    observe_every: int,
  ) -> TrainResult:
    """Runs ``steps`` Dopamine iterations with the pruned agent."""
    from prunax_dopamine import run as dopamine_run

    del observe, observe_every
    bindings = [
      f'JaxDQNAgent.seed={seed}',
      f'JaxDQNAgent.update_period={self.update_period}',
      f'Runner.num_iterations={steps}',
      f'Runner.training_steps={self.training_steps}',
      'Runner.evaluation_steps=0',
    ]
    start = time.perf_counter()
    prefix = f'cartpole-{type(updater).__name__}-{seed}-'
    with tempfile.TemporaryDirectory(prefix=prefix) as base_dir:
      lines = dopamine_run.run(
        base_dir, ['dqn_cartpole.gin'], bindings, pruner=self.agent_updater(updater)
      )
    seconds = time.perf_counter() - start
    returns = [float(line.rsplit('=', 1)[1]) for line in lines if 'Train/AverageReturns' in line]
    sparsity = [float(line.rsplit('=', 1)[1]) for line in lines if 'Sparsity/Total ' in line]
    return TrainResult(
      metric=returns[-1] if returns else float('nan'),
      sparsity=sparsity[-1] if sparsity else None,
      seconds_per_step=seconds / max(steps, 1),
    )


def cartpole_task(**kwargs: Any) -> CartPoleTask:
  """The task factory declared as ``cartpole`` in ``prunax.compare_tasks``.

  Args:
    **kwargs: the config's ``task_args``, fields of :class:`CartPoleTask`.

  Returns:
    The task.
  """
  return CartPoleTask(**kwargs)

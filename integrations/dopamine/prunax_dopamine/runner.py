"""Dopamine's own runners, creating a pruned agent chosen in gin.

Dopamine's ``run_experiment.create_runner`` builds its agents from a fixed list of names,
so a new agent class cannot be selected there by gin alone. :func:`create_pruned_runner`
takes its place and returns Dopamine's unchanged ``Runner`` or ``TrainRunner``; every other
binding (``Runner.*``, ``JaxDQNAgent.*``, environments, collectors) is Dopamine's.
"""

from __future__ import annotations

import gin

from prunax_dopamine import compat

compat.require()  # Names a missing compat.apply() before Dopamine fails to import.

from dopamine.discrete_domains import run_experiment  # noqa: E402

from prunax_dopamine import agents  # noqa: E402

_SCHEDULES = {
  'continuous_train_and_eval': run_experiment.Runner,
  'continuous_train': run_experiment.TrainRunner,
}


@gin.configurable(module='prunax_dopamine')
def create_pruned_runner(
  base_dir: str,
  schedule: str = 'continuous_train_and_eval',
  agent: type = agents.PrunedDQNAgent,
  debug_mode: bool = False,
) -> run_experiment.Runner:
  """Dopamine's runner for ``schedule``, training ``agent``.

  Args:
    base_dir: directory for checkpoints, logs and metrics (resumes from it).
    schedule: 'continuous_train_and_eval' (``Runner``) or 'continuous_train'
      (``TrainRunner``), as in ``run_experiment.create_runner``.
    agent: the agent class, e.g. ``@prunax_dopamine.PrunedRainbowAgent`` in gin; called
      with ``num_actions`` and ``summary_writer``.
    debug_mode: give the agent a TensorBoard summary writer (as Dopamine's
      ``create_agent.debug_mode``).

  Returns:
    A ``run_experiment.Runner``; call ``.run_experiment()``.

  Raises:
    ValueError: for an unknown schedule.
  """
  if schedule not in _SCHEDULES:
    raise ValueError(f'Unknown schedule {schedule!r}; valid schedules are {sorted(_SCHEDULES)}.')

  def create_agent(sess, environment, summary_writer=None):
    del sess  # JAX agents have no TensorFlow session.
    return agent(
      num_actions=environment.action_space.n, summary_writer=summary_writer if debug_mode else None
    )

  return _SCHEDULES[schedule](base_dir, create_agent)

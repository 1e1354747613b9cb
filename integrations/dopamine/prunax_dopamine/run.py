r"""Runs a pruned Dopamine experiment: Dopamine's ``train.py`` with a pruned agent.

    python -m prunax_dopamine.run --base_dir=/tmp/pruned_cartpole
    python -m prunax_dopamine.run --base_dir=/tmp/pruned_mspacman \
        --gin_files=dqn_mspacman_erk98.gin

``--gin_files`` takes paths or the names of the configs shipped in
``prunax_dopamine/configs`` (default: ``dqn_cartpole.gin``, seconds on a CPU); the runner
resumes from ``--base_dir`` if it holds a checkpoint. At the end, the returns and sparsity
that Dopamine's console collector recorded are printed. :func:`run` first applies the fixes
Dopamine needs on the installed versions (:func:`prunax_dopamine.compat.apply`).
"""

from __future__ import annotations

import os

import gin
from absl import app
from absl import flags
from absl import logging

import prunax
import prunax_dopamine
from prunax_dopamine import compat

flags.DEFINE_string('base_dir', None, 'Directory for checkpoints, logs and metrics.')
flags.DEFINE_multi_string(
  'gin_files',
  [prunax_dopamine.config_path('dqn_cartpole.gin')],
  'Gin config paths, or names of configs shipped with prunax_dopamine (used when no file '
  'of that name exists).',
)
flags.DEFINE_multi_string(
  'gin_bindings', [], 'Extra gin bindings, e.g. "prunax_dopamine.pruner.algorithm=\'rigl\'".'
)

FLAGS = flags.FLAGS

_REPORTED = (
  'Train/AverageReturns',
  'Eval/AverageReturns',
  'Sparsity/Total',
  'Sparsity/TargetTotal',
)


def resolve_gin_file(name: str) -> str:
  """``name`` if it is a file, else the shipped config of that name."""
  return name if os.path.isfile(name) else prunax_dopamine.config_path(name)


def run(
  base_dir: str,
  gin_files: list[str],
  gin_bindings: list[str],
  pruner: prunax.BaseUpdater | None = None,
) -> list[str]:
  """Loads the configs, runs the experiment and returns the console collector's report lines.

  Gin bindings made earlier in the process are cleared first. Applies the fixes Dopamine
  needs (:func:`prunax_dopamine.compat.apply`) before importing it.

  Args:
    base_dir: the experiment directory.
    gin_files: gin config paths or shipped config names.
    gin_bindings: extra gin bindings.
    pruner: an updater bound as ``PrunedDQNAgent.pruner`` after the configs, replacing the
      gin-built one (its schedule counts optimizer updates; ``prunax compare`` passes the
      updater of its config).

  Returns:
    The returns and sparsity lines Dopamine's console collector wrote (empty if the
    'console' collector is disabled).
  """
  compat.apply()
  from dopamine.discrete_domains import run_experiment

  from prunax_dopamine import runner as runner_lib  # Registers the gin configurables.

  # A clean config each call: gin locks it after loading, so a second experiment in the
  # same process (prunax compare runs one per algorithm and seed) could not load its own.
  gin.clear_config()
  run_experiment.load_gin_configs([resolve_gin_file(f) for f in gin_files], gin_bindings)
  if pruner is not None:
    with gin.unlock_config():
      gin.bind_parameter('prunax_dopamine.PrunedDQNAgent.pruner', pruner)
  runner = runner_lib.create_pruned_runner(base_dir)
  runner.run_experiment()
  console_log = os.path.join(base_dir, 'metrics', 'console', 'console.log')
  if not os.path.isfile(console_log):
    return []
  with open(console_log) as f:
    return [line.rstrip() for line in f if any(f' {key} = ' in line for key in _REPORTED)]


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  for line in run(FLAGS.base_dir, FLAGS.gin_files, FLAGS.gin_bindings):
    print(line)


def console_main():
  """Entry point of the ``prunax-dopamine`` command."""
  flags.mark_flag_as_required('base_dir')
  app.run(main)


if __name__ == '__main__':
  console_main()

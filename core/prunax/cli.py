"""The ``prunax`` command. ``prunax compare`` runs every algorithm on the same task;
``prunax oneshot`` prunes a trained model from calibration data (SparseGPT, Wanda).

    prunax compare                        # the default demo: digits, 80% sparsity, 3 seeds
    prunax compare --quick                # a tiny version (CI)
    prunax compare --config my.yaml --algorithms magnitude,rigl --sparsity 0.9 --seeds 5
    prunax compare --sparsity 0.5,0.8,0.9,0.95,0.98 --training-budget equal_flops
    prunax oneshot --model my_model.py:get_model --method sparsegpt --sparsity-type 2:4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def _parse_set(items: Sequence[str]) -> dict:
  import yaml

  from prunax.compare import ConfigError

  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ConfigError(f'--set takes KEY=VALUE, got {item!r}.')
    try:
      out[key.strip()] = yaml.safe_load(value)
    except yaml.YAMLError as e:
      raise ConfigError(f'--set {item!r}: the value is not valid YAML ({e}).') from e
  return out


def _compare_parser(sub) -> None:
  p = sub.add_parser(
    'compare',
    help='compare pruning algorithms on one task and recipe',
    description='Trains every algorithm with the same task, model and recipe over several '
    'seeds, at one sparsity or a sweep; prints and writes (Markdown, CSV, PNG, '
    'one self-contained report.html) mean and std of accuracy, paired '
    'differences to dense and to the best method with 95% intervals, sparsity, '
    'FLOPs, mask memory and step time. Finished cells of a run directory are '
    'reused.',
  )
  p.add_argument(
    '--config',
    help='YAML file, Python file with get_config() (ml_collections), '
    'or the name of a shipped config (default: "default")',
  )
  p.add_argument(
    '--task',
    help=(
      'digits | noisy_digits | lm | a task of an installed package (prunax-fedjax: '
      'federated_digits, prunax-dopamine: cartpole) | module:function | file.py:function'
    ),
  )
  p.add_argument('--algorithms', help='comma-separated algorithm names')
  p.add_argument(
    '--sparsity',
    help='target sparsity in [0, 1), or a comma-separated sweep (e.g. 0.5,0.8,0.9,0.95,0.98)',
  )
  p.add_argument(
    '--distribution', '--dist-type', dest='dist_type', help='sparsity distribution: uniform | erk'
  )
  p.add_argument(
    '--sparsity-type',
    help='unstructured | nm_N,M | block_B1,B2 | channel_AXIS; '
    'several separated by ";" (e.g. "unstructured;nm_2,4")',
  )
  p.add_argument(
    '--training-budget',
    help='equal_steps | equal_flops | a step multiplier for '
    "sparse-to-sparse algorithms (e.g. 2 or 5, the RigL paper's 2x/5x)",
  )
  p.add_argument('--schedule', help='gradual | one_shot | START:END:FREQ')
  p.add_argument('--steps', type=int, help='training steps per (algorithm, seed)')
  p.add_argument('--seeds', help='number of seeds, or a comma-separated list of seeds')
  p.add_argument('--run-dir', help='directory of results, plots and resumable cells')
  p.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='any config key, the value parsed as YAML (repeatable)',
  )
  p.add_argument('--quick', action='store_true', help='tiny run (few steps, one seed) for CI')
  p.add_argument('--fresh', action='store_true', help='recompute the cells in the run dir')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p.add_argument('--no-plots', action='store_true', help='skip the PNG plots')
  p.add_argument(
    '--no-compile-cache',
    action='store_true',
    help='do not keep compiled steps in the user cache directory between runs',
  )


def _budget(value: str | None) -> str | float | None:
  try:
    return (
      float(value) if value is not None and value not in ('equal_steps', 'equal_flops') else value
    )
  except ValueError:
    return value  # load_config names it and the valid values.


def _enable_compile_cache() -> None:
  """Keeps XLA executables between runs (JAX's persistent compilation cache), unless the
  user already chose a cache directory: compiling the steps is most of a short run."""
  import jax

  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or jax.config.jax_compilation_cache_dir:
    return
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  jax.config.update('jax_compilation_cache_dir', os.path.join(base, 'prunax', 'jax'))


def compare(args: argparse.Namespace) -> int:
  """Runs ``prunax compare``; returns the exit status."""
  from rich.console import Console

  from prunax import compare as compare_lib

  console = Console()
  if not console.is_terminal:  # Logs and pipes: do not squeeze the table into 80 columns.
    console = Console(width=max(console.width, 200))
  start = time.perf_counter()
  overrides = {
    'task': args.task,
    'algorithms': args.algorithms,
    'sparsity': args.sparsity,
    'dist_type': args.dist_type,
    'sparsity_type': args.sparsity_type,
    'schedule': args.schedule,
    'steps': args.steps,
    'seeds': args.seeds,
    'run_dir': args.run_dir,
    'training_budget': _budget(args.training_budget),
  }
  overrides.update(_parse_set(args.set))
  cfg = compare_lib.load_config(args.config, overrides, quick=args.quick)
  if not args.no_compile_cache:
    _enable_compile_cache()
  show = not args.no_progress and console.is_terminal
  from prunax.compare import runner

  with runner.rich_progress(show) as progress:
    result = compare_lib.run_sweep(cfg, fresh=args.fresh, progress=progress)
  compare_lib.print_table(result, console)
  plots = {} if args.no_plots else compare_lib.write_plots(result)
  paths = dict(plots, **compare_lib.write_reports(result, plots))
  skipped = sorted({s for c in result.points for s in c.skipped})
  if skipped:
    console.print(f'Optional algorithms skipped: {"; ".join(skipped)}')
  console.print(f'Wrote {", ".join(sorted(paths.values()))}')
  console.print(f'Total time {time.perf_counter() - start:.1f} s')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``prunax`` console command."""
  parser = argparse.ArgumentParser(prog='prunax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  _compare_parser(sub)
  from prunax.oneshot import command as oneshot_command

  oneshot_command.add_parser(sub)
  args = parser.parse_args(argv)
  from prunax.compare import ConfigError

  try:
    if args.command == 'oneshot':
      return oneshot_command.run(args)
    return compare(args)
  except (ConfigError, oneshot_command.OneShotConfigError) as e:
    print(f'prunax {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())

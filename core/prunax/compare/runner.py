"""Runs every (algorithm, seed) cell of a comparison, measures it, and resumes run dirs.

A run directory holds ``config.json`` (the config the cells were computed with), one
``cells/<algorithm>__seed<seed>.json`` per finished cell (with the final params in a
``.npz`` next to it when the task exposes them), and the reports. Cells already on disk
are loaded, not recomputed; a run directory made with a different recipe is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import engines
from prunax import flops as flops_lib
from prunax import registry
from prunax import sparsity_types
from prunax.base_updater import BaseUpdater
from prunax.base_updater import get_sparse_state
from prunax.compare import config as config_lib
from prunax.compare import tasks as tasks_lib
from prunax.compare.config import ConfigError
from prunax.sparsity_distributions import named_leaves
from prunax.summary import summarize_sparsity


@dataclasses.dataclass
class Comparison:
  """The result of :func:`run_comparison`.

  Attributes:
    config: the checked config.
    task_name: the task's name.
    metric_name: 'accuracy', 'return'...
    algorithms: the algorithms run, in order.
    categories: per algorithm ``{'origin', 'dynamics', 'structure'}``.
    cells: per (algorithm, seed) the measured figures (see :func:`measure_cell`).
    layer_targets: per distribution ('uniform', 'erk') the per-layer target sparsities.
    run_dir: where the reports were written.
    skipped: optional algorithms left out, each with the reason (not registered, or the
      config does not suit it).
    higher_is_better: the task's metric direction (False for a perplexity): which
      algorithm is best, and which sign of a paired difference is a loss.
  """

  config: dict[str, Any]
  task_name: str
  metric_name: str
  algorithms: list[str]
  categories: dict[str, dict[str, str]]
  cells: dict[tuple[str, int], dict[str, Any]]
  layer_targets: dict[str, dict[str, float]]
  run_dir: str
  skipped: list[str]
  higher_is_better: bool = True


def higher_is_better(task: Any) -> bool:
  """A task's ``higher_is_better`` (True when it has none).

  Raises:
    ConfigError: the attribute is not a bool.
  """
  value = getattr(task, 'higher_is_better', True)
  if not isinstance(value, (bool, np.bool_)):
    raise ConfigError(
      f'Task {getattr(task, "name", task)!r} has higher_is_better={value!r}; it must be '
      'True (accuracy, return) or False (perplexity, loss).'
    )
  return bool(value)


def category(
  algorithm: str, updater: BaseUpdater, overrides: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, str]:
  """Sparseland's positioning of an algorithm: origin, dynamics and structure.

  Origin and dynamics come from :func:`prunax.registry.algorithm_info` (the metadata the
  README's algorithm table also states), the structure from the updater's sparsity type;
  ``overrides`` entries (the config's ``categories``) replace them.
  """
  out = registry.algorithm_info(algorithm)
  out['structure'] = (
    'unstructured'
    if isinstance(updater.sparsity_type, sparsity_types.Unstructured)
    else 'structured'
  )
  out.update((overrides or {}).get(algorithm, {}))
  return out


def _cell_name(algorithm: str, seed: int) -> str:
  return f'{algorithm}__seed{seed}'


def _write_json(path: str, data: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # Atomic: an interrupted run leaves no half-written cell.


def prepare_run_dir(run_dir: str, cfg: Mapping[str, Any], fresh: bool = False) -> None:
  """Creates (or checks) ``run_dir``: writable, and made with the same recipe.

  Raises:
    ConfigError: the directory cannot be created or written, or holds cells of a
      different config (named key by key).
  """
  cells = os.path.join(run_dir, 'cells')
  try:
    if fresh and os.path.isdir(cells):
      shutil.rmtree(cells)
    os.makedirs(cells, exist_ok=True)
    probe = os.path.join(run_dir, '.write_probe')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
      f'Run directory {run_dir!r} is not writable: {e.strerror or e}. '
      'Choose another with --run-dir.'
    ) from e
  fingerprint = config_lib.cell_fingerprint(cfg)
  path = os.path.join(run_dir, 'config.json')
  if os.path.isfile(path) and os.listdir(cells):
    with open(path) as f:
      previous = json.load(f)
    diff = sorted(
      k
      for k in set(previous) | set(fingerprint)
      if previous.get(k) != json.loads(json.dumps(fingerprint.get(k)))
    )
    if diff:
      raise ConfigError(
        f'Run directory {run_dir!r} holds cells computed with a different config (keys '
        f'{diff}: {[previous.get(k) for k in diff]} there, '
        f'{[fingerprint.get(k) for k in diff]} now); use another --run-dir or --fresh.'
      )
  _write_json(path, fingerprint)


def _mask_memory(opt_state: Any, params: Any) -> float:
  """Bytes of the masks in the SparseState over the bytes of the params."""
  masks = get_sparse_state(opt_state).masks
  mask_bytes = sum(np.asarray(m).nbytes for m in jax.tree.leaves(masks))
  param_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
  return mask_bytes / param_bytes if param_bytes else 0.0


def _flops_counter(task: Any, params: Any):
  """A prunax.flops counter for tasks with ``apply_fn`` and ``example_inputs``, else None."""
  if params is None or not hasattr(task, 'example_inputs'):
    return None
  try:
    return flops_lib.FlopsCounter(task.apply_fn, params, *task.example_inputs())
  except Exception as e:
    # FLOPs are one figure among several: report them as n/a rather than lose the run.
    warnings.warn(
      f'FLOPs of task {task.name!r} cannot be counted ({type(e).__name__}: {e}); '
      'they are reported as n/a.',
      stacklevel=2,
    )
    return None


def run_cell(
  task: Any,
  updater: BaseUpdater,
  seed: int,
  steps: int,
  observe_points: int,
  counter: Any = None,
  on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], Any]:
  """Trains one cell and measures it.

  Returns:
    ``(figures, final_params)``; figures hold ``metric``, ``sparsity`` (measured on the
    final params with :func:`prunax.summarize_sparsity`), ``layer_sparsity``,
    ``inference_flops`` and ``training_flops`` (fractions of dense; None without
    ``prunax.flops``; training FLOPs averaged over the observed steps, with dense weight
    gradients for STE-style algorithms), ``mask_memory``
    (mask bytes / param bytes), ``seconds_per_step``, ``compile_seconds`` and ``trace``
    (``[step, total sparsity]`` pairs).
  """
  trace: list[list[float]] = []
  averager = flops_lib.TrainingFlopsAverager(counter) if counter is not None else None
  every = max(1, steps // observe_points)
  last = [0]

  def observe(step: int, params: Any) -> None:
    trace.append([step, summarize_sparsity(params, only_total=True)['total_sparsity']])
    if averager is not None:
      # STE-style algorithms take the gradient of every (dense) weight.
      backward = (
        jax.tree.map(jnp.ones_like, params) if engines.trains_dense_weights(updater) else None
      )
      averager.add(params, backward)
    if on_progress is not None:
      on_progress(step - last[0])
    last[0] = step

  result = task.run(updater, seed, steps, observe, every)
  if on_progress is not None and last[0] < steps:
    on_progress(steps - last[0])
  figures: dict[str, Any] = {
    'metric': float(result.metric),
    'seconds_per_step': float(result.seconds_per_step),
    'compile_seconds': float(result.compile_seconds),
    'trace': trace,
    'inference_flops': None,
    'training_flops': None,
    'mask_memory': None,
    'layer_sparsity': {},
  }
  if result.params is not None:
    summary = summarize_sparsity(result.params)
    figures['sparsity'] = summary['total_sparsity']
    figures['layer_sparsity'] = {
      k.split('/', 1)[1]: v for k, v in summary.items() if k.startswith('sparsity/')
    }
    if counter is not None:
      figures['inference_flops'] = float(counter.inference_fraction(result.params))
      figures['training_flops'] = float(averager.fraction) if averager.steps else None
  else:
    figures['sparsity'] = result.sparsity
  if result.opt_state is not None and result.params is not None:
    figures['mask_memory'] = _mask_memory(result.opt_state, result.params)
  return figures, result.params


def _save_params(path: str, params: Any) -> None:
  arrays = {name: np.asarray(x) for name, x in named_leaves(params)}
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_params(run_dir: str, algorithm: str, seed: int) -> dict[str, np.ndarray]:
  """The final params of a finished cell, by parameter name ('params/Dense_0/kernel')."""
  with np.load(os.path.join(run_dir, 'cells', _cell_name(algorithm, seed) + '.npz')) as data:
    return dict(data)


def plan(
  config: Any = None, task: Any = None
) -> tuple[dict[str, Any], Any, list[str], list[str], dict[str, BaseUpdater]]:
  """Checks everything a comparison needs before training.

  Returns:
    ``(config, task, algorithms, skipped optional algorithms, updater of each algorithm
    for seed 0)``.

  Raises:
    ConfigError: bad config, unknown task or algorithm, sparsity a model cannot take.
  """
  cfg = config_lib.load_config(config)  # Idempotent on a checked config.
  if config_lib.is_sweep(cfg):
    raise ConfigError(
      f'The config sweeps {len(config_lib.points(cfg))} (sparsity_type, '
      'sparsity) points; run it with run_sweep, or give one sparsity and type.'
    )
  if task is None or isinstance(task, str) or not hasattr(task, 'run'):
    try:
      task = tasks_lib.make_task(task or cfg['task'], cfg['task_args'])
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from e
  known = registry.all_algorithm_names()
  skipped = [f'{a} (not registered)' for a in cfg['optional_algorithms'] if a not in known]
  updaters = {a: config_lib.make_updater(cfg, a, cfg['seeds'][0]) for a in cfg['algorithms']}
  for name in cfg['optional_algorithms']:
    if name in known and name not in updaters:
      try:  # An optional algorithm that cannot take this config is left out, with the reason.
        updaters[name] = config_lib.make_updater(cfg, name, cfg['seeds'][0])
      except ConfigError as e:
        skipped.append(f'{name} ({e.__cause__ or e})')
  params = task.example_params()
  if params is not None:
    for name, updater in list(updaters.items()):
      try:
        updater.target_sparsities(params)
      except (ValueError, TypeError) as e:
        if name in cfg['algorithms']:
          raise ConfigError(f'Algorithm {name!r} cannot prune task {task.name!r}: {e}') from e
        skipped.append(f'{name} ({e})')
        del updaters[name]
  algorithms = list(updaters)
  return cfg, task, algorithms, skipped, updaters


def _params_at(example: Any, targets: Any, scale: float) -> Any:
  """Arrays shaped like ``example`` with ``round(scale * target * size)`` zeros per leaf."""

  def leaf(x, s):
    out = np.ones(x.shape, np.float32)
    if s is not None:
      out.reshape(-1)[: int(round(scale * float(s) * out.size))] = 0.0
    return out

  return jax.tree.map(leaf, example, targets, is_leaf=lambda x: x is None)


def step_multipliers(
  cfg: Mapping[str, Any], updaters: Mapping[str, BaseUpdater], example: Any, counter: Any
) -> dict[str, float]:
  """Training-length multiplier of every algorithm under ``cfg['training_budget']``.

  ``equal_steps``: 1 for all. A number ``k``: ``k`` for sparse-to-sparse algorithms, 1 for
  the others. ``equal_flops``: for a sparse-to-sparse algorithm, ``F_ref / F_a`` clipped to
  [1, ``max_step_multiplier``], where ``F_a`` is the training-FLOPs fraction (of dense) of its
  target masks and ``F_ref`` that of gradual magnitude pruning under the same config,
  averaged over its schedule (dense before pruning starts); both from
  :class:`prunax.flops.FlopsCounter` on masks at the per-layer targets (drop-and-grow's
  occasional dense gradients are not counted).

  Raises:
    ConfigError: ``equal_flops`` on a task whose FLOPs cannot be counted.
  """
  budget = cfg['training_budget']
  out = {}
  for name in updaters:
    sparse_to_sparse = registry.algorithm_info(name)['origin'] == 'sparse-to-sparse'
    if budget == 'equal_steps' or not sparse_to_sparse:
      out[name] = 1.0
    elif budget != 'equal_flops':
      out[name] = float(budget)
  if budget != 'equal_flops':
    return out
  if counter is None:
    raise ConfigError(
      "training_budget equal_flops needs the task's FLOPs (a task with "
      'apply_fn and example_inputs, and prunax.flops); use equal_steps or a '
      'step multiplier.'
    )
  reference = config_lib.make_updater(dict(cfg, step_multipliers={}), 'magnitude', 0)
  targets = reference.target_sparsities(example)
  steps = cfg['steps']
  grid = np.linspace(0, steps, 21)
  f_ref = float(
    np.mean(
      [
        counter.training_fraction(
          _params_at(example, targets, float(reference.scheduler.sparsity(t, 1.0)))
        )
        for t in grid
      ]
    )
  )
  for name, updater in updaters.items():
    if name not in out:
      f_a = counter.training_fraction(_params_at(example, updater.target_sparsities(example), 1.0))
      out[name] = float(np.clip(f_ref / max(f_a, 1e-12), 1.0, cfg['max_step_multiplier']))
  return out


def run_comparison(
  config: Any = None,
  task: Any = None,
  *,
  fresh: bool = False,
  progress: Any = None,
  shared: dict | None = None,
) -> Comparison:
  """Trains every algorithm with every seed on the same task and recipe, and measures them.

  Args:
    config: a checked config (:func:`prunax.compare.load_config`), a path, a dict or an
      ``ml_collections.ConfigDict`` (merged over the defaults).
    task: a task object or factory name overriding the config's ``task``.
    fresh: delete the cells of a previous run in the run directory first.
    progress: a ``rich.progress.Progress`` to report on (None: silent).
    shared: cells shared between the points of a sweep, ``{('no_prune', seed): path of the
      cell without extension}``: those found there are copied instead of trained (the dense
      baseline does not depend on the sparsity), and those of this run are put there.

  Returns:
    The :class:`Comparison`; cells found in the run directory are loaded, not retrained.

  Raises:
    ConfigError: before any training, for bad input.
  """
  cfg, task, algorithms, skipped, updaters = plan(config, task)
  direction = higher_is_better(task)
  run_dir = cfg['run_dir']
  prepare_run_dir(run_dir, cfg, fresh=fresh)
  example = task.example_params()
  counter = _flops_counter(task, example)
  cfg['step_multipliers'] = step_multipliers(cfg, updaters, example, counter)
  if any(m != 1.0 for m in cfg['step_multipliers'].values()):  # The schedules stretch too.
    updaters = {a: config_lib.make_updater(cfg, a, cfg['seeds'][0]) for a in algorithms}
  cells: dict[tuple[str, int], dict[str, Any]] = {}
  seeds = cfg['seeds']
  shared = {} if shared is None else shared

  def done(a: str, s: int) -> bool:
    return (a == 'no_prune' and (a, s) in shared) or os.path.isfile(
      os.path.join(run_dir, 'cells', _cell_name(a, s) + '.json')
    )

  if hasattr(task, 'prepare'):  # Compile ahead the algorithms with unfinished cells.
    task.prepare([updaters[a] for a in algorithms if not all(done(a, s) for s in seeds)])
  total = sum(config_lib.algorithm_steps(cfg, a) for a in algorithms) * len(seeds)
  overall = progress.add_task('all cells', total=total) if progress is not None else None
  for algorithm in algorithms:
    steps = config_lib.algorithm_steps(cfg, algorithm)
    for seed in seeds:
      name = _cell_name(algorithm, seed)
      path = os.path.join(run_dir, 'cells', name + '.json')
      if algorithm == 'no_prune' and (algorithm, seed) in shared and not os.path.isfile(path):
        source = shared[(algorithm, seed)]  # The cell of another point: copied.
        if os.path.isfile(source + '.npz'):
          shutil.copyfile(source + '.npz', os.path.join(run_dir, 'cells', name + '.npz'))
        shutil.copyfile(source + '.json', path)
      if os.path.isfile(path):
        with open(path) as f:
          cells[(algorithm, seed)] = json.load(f)
        if algorithm == 'no_prune':
          shared[(algorithm, seed)] = os.path.join(run_dir, 'cells', name)
        if progress is not None:
          progress.advance(overall, steps)
        continue
      current = (
        progress.add_task(f'{algorithm} seed {seed}', total=steps) if progress is not None else None
      )

      def advance(n: int, current=current) -> None:
        if progress is not None:
          progress.advance(current, n)
          progress.advance(overall, n)

      start = time.perf_counter()
      updater = config_lib.make_updater(cfg, algorithm, seed)
      figures, params = run_cell(
        task, updater, seed, steps, cfg['observe_points'], counter, advance
      )
      figures.update(
        algorithm=algorithm,
        seed=seed,
        seconds=time.perf_counter() - start,
        target_sparsity=0.0 if algorithm == 'no_prune' else cfg['sparsity'],
        steps=steps,
        updater_config=config_lib.updater_config(cfg, algorithm, seed),
      )
      if params is not None:
        _save_params(os.path.join(run_dir, 'cells', name + '.npz'), params)
      _write_json(path, figures)
      cells[(algorithm, seed)] = figures
      if algorithm == 'no_prune':
        shared[(algorithm, seed)] = os.path.join(run_dir, 'cells', name)
      if progress is not None:
        progress.remove_task(current)
  layer_targets = {}
  if example is not None:
    from prunax import sparsity_distributions

    for dist in ('uniform', 'erk'):
      targets = sparsity_distributions.resolve(dist)(example, cfg['sparsity'])
      layer_targets[dist] = {
        n: float(s) for n, s in named_leaves(targets, is_leaf=lambda x: x is None) if s is not None
      }
  categories = {a: category(a, updaters[a], cfg['categories']) for a in algorithms}
  return Comparison(
    config=cfg,
    task_name=task.name,
    metric_name=task.metric_name,
    algorithms=algorithms,
    categories=categories,
    cells=cells,
    layer_targets=layer_targets,
    run_dir=run_dir,
    skipped=skipped,
    higher_is_better=direction,
  )


@dataclasses.dataclass
class Sweep:
  """The result of :func:`run_sweep`: one :class:`Comparison` per (sparsity_type, sparsity).

  Attributes:
    config: the checked config (``sparsity`` and ``sparsity_type`` may be lists).
    points: the comparisons, sparsity types first, sparsities ascending.
    run_dir: where the sweep's reports are written (each point has its own directory
      below it when there is more than one).
  """

  config: dict[str, Any]
  points: list[Comparison]
  run_dir: str

  @property
  def task_name(self) -> str:
    return self.points[0].task_name

  @property
  def metric_name(self) -> str:
    return self.points[0].metric_name

  @property
  def higher_is_better(self) -> bool:
    return self.points[0].higher_is_better


def point_dir(run_dir: str, sparsity_type: str, sparsity: float) -> str:
  """The run directory of one point of a sweep."""
  return os.path.join(run_dir, f'{sparsity_type.replace(",", "x")}_s{sparsity:g}')


def run_sweep(
  config: Any = None, task: Any = None, *, fresh: bool = False, progress: Any = None
) -> Sweep:
  """Runs a comparison at every (sparsity_type, sparsity) point of ``config``.

  One point runs in ``run_dir`` itself (as :func:`run_comparison`); several run each in
  :func:`point_dir`, on the same task object (compiled steps are reused), the dense baseline
  trained once and shared by all points. Every point is checked before any training.

  Raises:
    ConfigError: before any training, for bad input at any point.
  """
  cfg = config_lib.load_config(config)
  pts = config_lib.points(cfg)
  if len(pts) == 1:
    return Sweep(
      cfg,
      [run_comparison(config_lib.point_config(cfg, *pts[0]), task, fresh=fresh, progress=progress)],
      cfg['run_dir'],
    )
  configs = [
    dict(config_lib.point_config(cfg, t, s), run_dir=point_dir(cfg['run_dir'], t, s))
    for t, s in pts
  ]
  planned = [plan(c, task) for c in configs]  # Checks every point first.
  task = planned[0][1]
  shared: dict = {}
  comparisons = [
    run_comparison(c, task, fresh=fresh, progress=progress, shared=shared) for c in configs
  ]
  return Sweep(cfg, comparisons, cfg['run_dir'])


@contextlib.contextmanager
def rich_progress(enabled: bool = True):
  """A rich progress display (or None when disabled)."""
  if not enabled:
    yield None
    return
  from rich.progress import BarColumn
  from rich.progress import MofNCompleteColumn
  from rich.progress import Progress
  from rich.progress import TextColumn
  from rich.progress import TimeElapsedColumn

  with Progress(
    TextColumn('{task.description:<28}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
  ) as progress:
    yield progress

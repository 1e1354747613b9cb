"""Compile time of a pruned train step against the dense step, by number of prunable leaves.

Run from the repository root::

  python -m benchmarks.compile_time                 # MLPs of 4, 16, 64 layers of 256x256
  python -m benchmarks.compile_time --layers 4,16 --repeats 3 --algorithms magnitude,rigl
  python -m benchmarks.compile_time --warm-cache    # a relaunch with JAX's persistent cache
  python -m benchmarks.compile_time --init          # the optimizer state's init instead
  python -m benchmarks.compile_time --algorithms all --layers 16 --repeats 2
  python -m benchmarks.compile_time --phases        # JAX's trace + lower and XLA's compile apart

Each repeat compiles (``jax.jit(step).lower(params, state).compile()``, caches cleared)
the dense step and every pruned step of the same model, and reports the pruned / dense
ratio of trace + compile seconds (min / median / max over repeats). Nothing is asserted.
``--algorithms all`` times every registered algorithm that a plain config builds
(sparsity 0.9, 0.5 for N:M; mask updates every 10 steps until step 100).

With ``--warm-cache``, JAX's persistent compilation cache is on (a fresh temporary
directory, every program cached) and each timed compile comes after the same step was
compiled once and the in-memory caches were cleared: what a relaunch of a training job
pays (trace, lowering, and reading the executable back), e.g. t5x, which compiles at every
launch, with ``jax_compilation_cache_dir`` set. With ``--init``, the timed call is
``tx.init(params)`` (prunax compiles the masks' init once per updater and shapes; a random
initial mask runs a selection), against the dense optimizer's init.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import prunax
from prunax import _xla_workarounds
from prunax import sparsity_schedules as sched

# Each takes the step of its last mask update.
ALGORITHMS = {
  'magnitude': lambda end: prunax.MagnitudePruning(
    sparsity=0.9, scheduler=sched.PolynomialSchedule(10, 0, end)
  ),
  'global_magnitude': lambda end: prunax.GlobalMagnitudePruning(
    sparsity=0.9, scheduler=sched.PolynomialSchedule(10, 0, end)
  ),
  'set': lambda end: prunax.SET(sparsity=0.9, scheduler=sched.PeriodicSchedule(10, 0, end)),
  'rigl': lambda end: prunax.RigL(sparsity=0.9, scheduler=sched.PeriodicSchedule(10, 0, end)),
  'magnitude_ste': lambda end: prunax.SteMagnitudePruning(sparsity=0.9),
  'autosparse': lambda end: prunax.AutoSparse(),
}

_N_BY_M = ('nm_rigl', 'nm_set', 'sr_ste')


def updater(name: str, end: int = 100):
  """The updater ``name``: one of :data:`ALGORITHMS`, else built from a plain config; mask
  updates every 10 steps until step ``end``."""
  if name in ALGORITHMS:
    return ALGORITHMS[name](end)
  sparsity = 0.5 if name in _N_BY_M else 0.9
  config = {'algorithm': name, 'sparsity': sparsity, 'update_freq': 10, 'update_end_step': end}
  return prunax.create_updater_from_config(config)


def buildable() -> list[str]:
  """Every registered algorithm that a plain config builds (others need masks, a loss or
  an annealing schedule)."""
  names = []
  for name in prunax.all_algorithm_names():
    try:
      updater(name)
    except ValueError:
      continue
    names.append(name)
  return names


def named(spec: str) -> list[str]:
  """The algorithms of an ``--algorithms`` argument: comma-separated names, or ``all``
  (:func:`buildable`)."""
  return buildable() if spec == 'all' else spec.split(',')


def mlp_params(layers: int, width: int = 256):
  keys = jax.random.split(jax.random.PRNGKey(0), layers)
  return {
    f'layer{i}': {
      'kernel': jax.random.normal(keys[i], (width, width)) / 16.0,
      'bias': jnp.zeros(width),
    }
    for i in range(layers)
  }


def loss(params, x):
  for i in range(len(params)):
    x = jnp.tanh(x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias'])
  return jnp.mean(x**2)


def compile_seconds(tx, params, x, warm: bool = False) -> float:
  """Seconds to trace, lower and compile the train step of ``tx`` (caches cleared);
  ``warm``: after compiling it once into the persistent cache (see the module docstring)."""

  def step(p, s):
    g = jax.grad(loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  return _seconds(lambda: jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile(), warm)


def phase_seconds(tx, params, x, warm: bool = False) -> tuple[float, float]:
  """``(trace + lower, backend compile)`` seconds of the train step of ``tx`` (caches
  cleared; ``warm``: see :func:`compile_seconds`). JAX traces and lowers; XLA compiles."""

  def step(p, s):
    g = jax.grad(loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return lowered_phases(step, params, tx.init(params), warm=warm)


def lowered_phases(step, *args, warm: bool = False) -> tuple[float, float]:
  """``(trace + lower, backend compile)`` seconds of ``jit(step)`` (buffers of the first
  two arguments donated, as a train step's) on ``args``, JAX's in-memory caches cleared
  first; ``warm``: of the second such compile (see :func:`compile_seconds`)."""
  for _ in range(2 if warm else 1):
    jax.clear_caches()
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
    middle = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
  return middle - start, end - middle


def init_seconds(tx, params, x, warm: bool = False) -> float:
  """Seconds of ``tx.init(params)``, caches cleared: prunax compiles its part of the state
  (the masks: random ones run a selection) once per updater and shapes."""
  del x
  return _seconds(lambda: jax.block_until_ready(tx.init(params)), warm)


def _seconds(call, warm: bool) -> float:
  """Seconds of ``call()`` with JAX's in-memory caches cleared; ``warm``: of its second
  such call (the first fills the persistent cache)."""
  for _ in range(2 if warm else 1):
    jax.clear_caches()
    start = time.perf_counter()
    call()
  return time.perf_counter() - start


def use_persistent_cache() -> str:
  """Turns on JAX's persistent compilation cache in a fresh directory (returned) for
  every program, however fast it compiles."""
  path = tempfile.mkdtemp(prefix='prunax-compile-cache-')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    return next(
      line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name')
    )
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


def machine() -> str:
  """The CPU, the JAX device and the compiler workarounds switched off, for a header."""
  dev = jax.devices()[0]
  off = os.environ.get(_xla_workarounds.OFF_VARIABLE, '') or 'none'
  return (
    f'{cpu_model()}, {os.cpu_count()} cores, device {dev.platform} ({dev.device_kind}), '
    f'compiler workarounds off: {off}'
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', default='4,16,64')
  parser.add_argument(
    '--algorithms', default=','.join(ALGORITHMS), help='comma-separated names, or all'
  )
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--warm-cache', action='store_true', help='time a relaunch with the persistent cache'
  )
  parser.add_argument('--init', action='store_true', help="time the state's init, not the step")
  parser.add_argument(
    '--phases', action='store_true', help='JAX (trace + lower) and XLA (compile) apart'
  )
  args = parser.parse_args(argv)
  if args.phases and args.init:
    parser.error('--phases times the train step; it does not combine with --init.')
  if args.warm_cache:
    use_persistent_cache()
  what = ', relaunched with a warm persistent cache' if args.warm_cache else ''
  timed = 'init (tx.init, compile and run)' if args.init else 'train step'
  seconds = init_seconds if args.init else compile_seconds
  print(f'# Compile time, pruned / dense {timed} (adam, 256x256 layers, sparsity 0.9{what})')
  print(f'jax {jax.__version__}, {machine()}, {time.strftime("%Y-%m-%d")}\n')
  if args.phases:
    print(
      '| layers | algorithm | trace + lower s, dense / pruned (median) | ratio min / median / '
      'max | XLA compile s, dense / pruned (median) | ratio min / median / max |'
    )
    print('|---|---|---|---|---|---|')
  else:
    header = '| layers | algorithm | dense s (median) | pruned s (median) |'
    print(header + ' ratio min / median / max |')
    print('|---|---|---|---|---|')
  for layers in [int(n) for n in args.layers.split(',')]:
    params = mlp_params(layers)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 256))
    names = named(args.algorithms)
    for name in names:
      if args.phases:
        print(phases_row(layers, name, params, x, args.repeats, args.warm_cache), flush=True)
        continue
      dense, pruned = [], []
      for _ in range(args.repeats):
        tx = updater(name).wrap_optax(optax.adam(1e-3))
        dense.append(seconds(optax.adam(1e-3), params, x, args.warm_cache))
        pruned.append(seconds(tx, params, x, args.warm_cache))
      ratios = [p / d for p, d in zip(pruned, dense)]
      print(
        f'| {layers} | {name} | {statistics.median(dense):.2f} | '
        f'{statistics.median(pruned):.2f} | {min(ratios):.2f} / '
        f'{statistics.median(ratios):.2f} / {max(ratios):.2f} |',
        flush=True,
      )


def phases_row(layers: int, name: str, params, x, repeats: int, warm: bool) -> str:
  """A table row of :func:`phase_seconds` of the dense and the pruned step, alternated."""
  dense, pruned = [], []
  for _ in range(repeats):
    tx = updater(name).wrap_optax(optax.adam(1e-3))
    dense.append(phase_seconds(optax.adam(1e-3), params, x, warm))
    pruned.append(phase_seconds(tx, params, x, warm))
  return f'| {layers} | {name} | {phase_cells(dense, pruned)} |'


def phase_cells(dense: list, pruned: list) -> str:
  """The four table cells of alternated ``(trace + lower, compile)`` seconds of the dense
  and the pruned step: each phase's medians, then its pruned / dense ratio min / median /
  max over the repeats."""
  cells = []
  for i in (0, 1):
    d, p = [t[i] for t in dense], [t[i] for t in pruned]
    ratios = [a / b for a, b in zip(p, d)]
    cells.append(
      f'{statistics.median(d):.2f} / {statistics.median(p):.2f} | {min(ratios):.2f} / '
      f'{statistics.median(ratios):.2f} / {max(ratios):.2f}'
    )
  return ' | '.join(cells)


if __name__ == '__main__':
  main()

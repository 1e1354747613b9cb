"""What each compiler workaround does to a pruned step, switched off one at a time.

Run from the repository root::

  python -m benchmarks.workaround_switches --layers 64 --algorithms magnitude,set,autosparse

For each algorithm, the train step of ``benchmarks.compile_time``'s MLP (L layers of
256x256, adam, sparsity 0.9) is compiled with every workaround of
``prunax._xla_workarounds`` on, with all off, and with each one off alone
(``PRUNAX_XLA_WORKAROUNDS_OFF``, caches cleared before each compile). It prints the
trace + compile seconds, the step's temporaries (``memory_analysis()``) and its time
(fastest of 5 chained calls of a mask-update step where the algorithm has them), each
against the dense step compiled and run in the same way before the algorithm's rows.
Nothing is asserted: ``tests/core/test_xla_workarounds.py`` checks on CPU that each
workaround is still needed there. ``--deadline`` (seconds) skips the rows that would start
after it, so a run fits a lease on a lent machine.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks.compile_time import ALGORITHMS
from benchmarks.compile_time import loss
from benchmarks.compile_time import machine
from benchmarks.compile_time import mlp_params
from prunax import _xla_workarounds


def measure(tx, params, x, count=None, calls=5):
  """(trace + compile s, temporary bytes, fastest step s) of ``tx``'s train step."""

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p, x), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  jax.clear_caches()
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  p, best = jax.tree.map(jnp.copy, params), float('inf')
  for _ in range(calls):
    if count is not None:
      state = state._replace(count=jnp.int32(count))
    start = time.perf_counter()
    p, state = compiled(p, state)
    jax.block_until_ready(p)
    best = min(best, time.perf_counter() - start)
  return compile_s, temp, best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=64)
  parser.add_argument('--algorithms', default='magnitude,set,autosparse')
  parser.add_argument('--deadline', type=float, default=float('inf'))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f'# Workarounds switched off, MLP of {args.layers} layers of 256x256, adam, 0.9')
  print(f'jax {jax.__version__}, {machine()}, {time.strftime("%Y-%m-%d")}\n')
  print(
    '| algorithm | off | compile s | compile ratio | temp MB | temp ratio | step ms | step ratio |'
  )
  print('|---|---|---|---|---|---|---|---|')
  params = mlp_params(args.layers)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 256))
  saved = os.environ.get(_xla_workarounds.OFF_VARIABLE)
  try:
    for name in args.algorithms.split(','):
      os.environ.pop(_xla_workarounds.OFF_VARIABLE, None)
      dc, dt, ds = measure(optax.adam(1e-3), params, x)
      print(f'| dense | | {dc:.2f} | | {dt / 1e6:.2f} | | {ds * 1e3:.2f} | |', flush=True)
      # A step that updates its masks (count 10 with the schedules' frequency of 10).
      count = None if name in ('magnitude_ste', 'autosparse') else 10
      for off in ('', 'all', *_xla_workarounds.NAMES):
        if time.perf_counter() - start > args.deadline:
          print(f'| {name} | {off or "none"} | skipped: past the deadline | | | | | |')
          continue
        os.environ[_xla_workarounds.OFF_VARIABLE] = off
        c, t, s = measure(ALGORITHMS[name](100).wrap_optax(optax.adam(1e-3)), params, x, count)
        print(
          f'| {name} | {off or "none"} | {c:.2f} | {c / dc:.2f} | {t / 1e6:.2f} | '
          f'{t / max(dt, 1):.2f} | {s * 1e3:.2f} | {s / ds:.2f} |',
          flush=True,
        )
  finally:
    if saved is None:
      os.environ.pop(_xla_workarounds.OFF_VARIABLE, None)
    else:
      os.environ[_xla_workarounds.OFF_VARIABLE] = saved


if __name__ == '__main__':
  main()

"""Every algorithm's training step against the dense step, on the benchmark MLP.

Run from the repository root::

  python -m benchmarks.algorithm_steps --repeats 6

``benchmarks.run --steps-only`` times the algorithms the issue's targets name; this times
every algorithm a plain config builds (``benchmarks.compile_time.buildable``: sparsity 0.9,
0.5 for N:M, mask updates every 10 steps until step 1000), so that a switch of algorithm
has a known cost. Steps as in ``benchmarks.run``: donated buffers, dense and pruned steps
alternated, the fastest of 3 calls each; mask updates (and the steps of the
straight-through algorithms, which select at every step) are those of training from
init, from step 40 on (``run.KINDS``); steps without one are chained with the counter
reset to 11. Ratios to the dense step, min / median / max over repeats.
"""

from __future__ import annotations

import argparse
import statistics

import optax

from benchmarks import compile_time
from benchmarks import run
from prunax import engines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=6)
  parser.add_argument('--mlp', default='784,2048,2048,10', help='layer sizes')
  parser.add_argument('--algorithms', default='all', help='comma-separated, or all')
  args = parser.parse_args(argv)
  sizes = tuple(int(s) for s in args.mlp.split(','))
  params, batch = run.mlp(sizes), run.mlp_batch(sizes, 128)
  names = compile_time.named(args.algorithms)
  dense_tx = optax.adam(1e-3)
  dense_step = run.make_step(dense_tx)
  dense = list(run.run_steps(dense_step, run.copy_tree(params), dense_tx.init(params), batch, 2))
  print(f'# {run.environment()}')
  print(f'# MLP {"-".join(map(str, sizes))}, batch 128, Adam; {args.repeats} repeats')
  print('| algorithm | step | / dense, min / median / max | ms (median) | dense ms (median) |')
  print('|---|---|---|---|---|')
  for name in names:
    updater = compile_time.updater(name, end=1000)  # updates go on while timed
    tx = updater.wrap_optax(optax.adam(1e-3))
    step = run.make_step(tx)
    every = engines.trains_dense_weights(updater)
    kinds = ['every step'] if every else ['mask update', 'no mask update']
    for kind in kinds:
      ratios, ms, dms = [], [], []
      steps = run.alternated(step, tx, params, batch, dense, dense_step, args.repeats, kind)
      for d, t in steps:
        ratios.append(t / d)
        ms.append(t * 1e3)
        dms.append(d * 1e3)
      spread = f'{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}'
      print(
        f'| {name} | {kind} | {spread} | {statistics.median(ms):.1f} | '
        f'{statistics.median(dms):.1f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()

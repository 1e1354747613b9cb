"""Step temporaries of every algorithm against the dense step's (``memory_analysis()``).

Run from the repository root::

  python -m benchmarks.step_memory

Compiles the train step of the benchmark MLP (784-2048-2048-10, batch 128, Adam; params
and state donated, as ``benchmarks.run`` steps them) for every algorithm a plain config
builds (``benchmarks.compile_time.buildable``: sparsity 0.9, 0.5 for N:M) and prints its
temporary bytes against the dense step's plus the masks' bytes, the issue's target.
XLA's buffer assignment is deterministic for one jax version, so one compile each is the
measurement; ``tests/core/test_step_memory.py`` checks the same on a smaller MLP.
"""

from __future__ import annotations

import argparse

import jax
import optax

import prunax
from benchmarks import compile_time
from benchmarks import run


def temporaries(tx, params, batch) -> int:
  state = tx.init(params)
  lowered = run.make_step(tx).lower(params, state, batch)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mlp', default='784,2048,2048,10', help='layer sizes')
  parser.add_argument('--algorithms', default='all', help='comma-separated, or all')
  args = parser.parse_args(argv)
  sizes = tuple(int(s) for s in args.mlp.split(','))
  params, batch = run.mlp(sizes), run.mlp_batch(sizes, 128)
  names = compile_time.buildable() if args.algorithms == 'all' else args.algorithms.split(',')
  dense = temporaries(optax.adam(1e-3), params, batch)
  print(f'# {run.environment()}')
  print(f'# MLP {"-".join(map(str, sizes))}, batch 128, Adam; dense step: {dense / 1e6:.2f} MB')
  print('| algorithm | temporaries MB | / dense | dense + masks MB | over it, MB |')
  print('|---|---|---|---|---|')
  for name in names:
    tx = compile_time.updater(name).wrap_optax(optax.adam(1e-3))
    masks = prunax.get_sparse_state(tx.init(params)).masks
    target = dense + sum(m.nbytes for m in jax.tree.leaves(masks))
    got = temporaries(tx, params, batch)
    print(
      f'| {name} | {got / 1e6:.2f} | {got / dense:.2f} | {target / 1e6:.2f} | '
      f'{max(got - target, 0) / 1e6:.2f} |',
      flush=True,
    )


if __name__ == '__main__':
  main()

"""Step temporaries of every algorithm against the dense step's (``memory_analysis()``).

Run from the repository root::

  python -m benchmarks.step_memory
  python -m benchmarks.step_memory --model transformer --layout scanned

Compiles the train step of the benchmark MLP (784-2048-2048-10, batch 128, Adam; params
and state donated, as ``benchmarks.run`` steps them), or of the transformer LM of
``benchmarks.transformer`` (its layer axes given to every algorithm when scanned), for
every algorithm a plain config builds (``benchmarks.compile_time.buildable``: sparsity
0.9, 0.5 for N:M) and prints its temporary bytes against the dense step's plus the masks'
bytes, the issue's target.
XLA's buffer assignment is deterministic for one jax version, so one compile each is the
measurement; ``tests/core/test_step_memory.py`` checks the same on a smaller MLP.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import optax

import prunax
from benchmarks import compile_time
from benchmarks import run
from benchmarks import transformer


def temporaries(make_step, tx, params, batch) -> int:
  lowered = make_step(tx).lower(params, tx.init(params), batch)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=('mlp', 'transformer'), default='mlp')
  parser.add_argument('--layout', choices=('unrolled', 'scanned'), default='unrolled')
  parser.add_argument('--mlp', default='784,2048,2048,10', help='layer sizes')
  parser.add_argument('--algorithms', default='all', help='comma-separated, or all')
  args = parser.parse_args(argv)
  layer_axes = None
  if args.model == 'mlp':
    sizes = tuple(int(s) for s in args.mlp.split(','))
    params, batch = run.mlp(sizes), run.mlp_batch(sizes, 128)
    model = f'MLP {"-".join(map(str, sizes))}, batch 128'
    make_step = run.make_step
  else:
    batch = transformer.tokens_of(2)
    net, params, layer_axes = transformer.setup(12, args.layout, batch)
    model = f'transformer LM, {args.layout}, batch 2'

    def make_step(tx):
      return jax.jit(transformer.make_step(net, tx), donate_argnums=(0, 1))

  names = compile_time.named(args.algorithms)
  dense = temporaries(make_step, optax.adam(1e-3), params, batch)
  print(f'# {run.environment()}')
  print(f'# {model}, Adam; dense step: {dense / 1e6:.2f} MB')
  print('| algorithm | temporaries MB | / dense | dense + masks MB | over it, MB |')
  print('|---|---|---|---|---|')
  for name in names:
    updater = compile_time.updater(name)
    if layer_axes is not None:
      updater = dataclasses.replace(updater, layer_axes=layer_axes)
    tx = updater.wrap_optax(optax.adam(1e-3))
    masks = prunax.get_sparse_state(tx.init(params)).masks
    target = dense + sum(m.nbytes for m in jax.tree.leaves(masks))
    got = temporaries(make_step, tx, params, batch)
    print(
      f'| {name} | {got / 1e6:.2f} | {got / dense:.2f} | {target / 1e6:.2f} | '
      f'{max(got - target, 0) / 1e6:.2f} |',
      flush=True,
    )


if __name__ == '__main__':
  main()

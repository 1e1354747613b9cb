"""How many counting passes the selection loops of a mask update run, and how they narrow.

Run from the repository root::

  python -m benchmarks.search_passes                       # MLP 784-2048-2048-10
  python -m benchmarks.search_passes --model transformer --layout unrolled
  python -m benchmarks.search_passes --model transformer --layout scanned --algorithms set

Each algorithm's train step (the models, optimizer and schedules of ``benchmarks.run`` and
``benchmarks.transformer``: Adam, sparsity 0.9, a mask update every 10 steps) is traced
inside :func:`prunax.selection.count_passes` and run for ``--steps`` steps from the
initial state. For every step that ran a selection loop it prints, per loop (threshold or
tie search, with its number of brackets), the passes it ran and, at the start of each
pass, the brackets open and the most keys in one of them. A pass reads every
leaf whose rows shape is shared by an open bracket, so the passes of a loop, not its
brackets, are what a mask update pays for: on CPU one pass costs about one read of the
leaves with the scores' arithmetic (``jax.profiler`` traces of the MLP's SET update:
0.56 ms per pass over the 2048 x 2048 kernel's ``|w|``, 1.18 ms over its hashed random
grow scores). Nothing is asserted; ``tests/core/test_selection.py`` checks the log.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import jax
import optax

from benchmarks import run
from benchmarks import transformer
from benchmarks.compile_time import machine
from prunax import selection

UPDATING = ('magnitude', 'global_magnitude', 'set', 'rigl', 'magnitude_ste')


def model_and_step(model: str, layout: str):
  """``(params, algorithms, make_step(tx), batch)`` of the benchmark model."""
  if model == 'mlp':
    sizes = [784, 2048, 2048, 10]
    algorithms = {name: pruner for name, (pruner, _) in run.algorithms(True).items()}
    return run.mlp(sizes), algorithms, run.make_step, run.mlp_batch(sizes, 128)
  if model != 'transformer':
    raise ValueError(f'--model must be mlp or transformer, got {model!r}.')
  tokens = transformer.tokens_of(2)
  lm, params, layer_axes = transformer.setup(12, layout, tokens)
  algorithms = {name: p for name, (p, _) in transformer.algorithms(layer_axes).items()}

  def make_step(tx):
    return jax.jit(transformer.make_step(lm, tx), donate_argnums=(0, 1))

  return params, algorithms, make_step, tokens


def loops_of(records: list) -> dict:
  """``{loop: records}`` of one step's records, in the loops' order."""
  loops = collections.defaultdict(list)
  for r in records:
    loops[r.loop].append(r)
  return dict(sorted(loops.items()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp', help='mlp or transformer')
  parser.add_argument('--layout', default='unrolled', help='transformer: unrolled or scanned')
  parser.add_argument('--algorithms', default=','.join(UPDATING))
  parser.add_argument('--steps', type=int, default=41)
  args = parser.parse_args(argv)
  params, algorithms, make_step, batch = model_and_step(args.model, args.layout)
  where = args.model if args.model == 'mlp' else f'{args.model}, {args.layout}'
  print(f'# Counting passes of the selection loops ({where}), {machine()}, jax {jax.__version__}')
  totals = {}
  for name in args.algorithms.split(','):
    if name not in algorithms:
      raise ValueError(f'unknown algorithm {name!r}; choose from {sorted(algorithms)}.')
    tx = algorithms[name].wrap_optax(optax.adam(1e-3))
    with selection.count_passes() as log:
      step = make_step(tx)
      p, s = run.copy_tree(params), tx.init(params)
      print(f'\n## {name}')
      per_update = []
      for i in range(args.steps):
        before = len(log)
        p, s = step(p, s, batch)
        jax.block_until_ready(p)
        jax.effects_barrier()
        loops = loops_of(log[before:])
        if not loops:
          continue
        # A pass of a loop that searches thresholds and breaks ties may serve both: it
        # records once for each kind, under one index.
        per_update.append(sum(len({r.index for r in rs}) for rs in loops.values()))
        for loop, rs in loops.items():
          for kind in dict.fromkeys(r.kind for r in rs):
            of_kind = [r for r in rs if r.kind == kind]
            print(
              f'step {i:3d} loop {loop} {kind:9s} brackets {rs[0].brackets:4d}: '
              f'{len(of_kind)} passes; open {[r.open for r in of_kind]}; '
              f'keys {[r.keys for r in of_kind]}'
            )
    totals[name] = per_update
  print('\n| algorithm | steps with a selection | passes per step: min / median / max |')
  print('|---|---|---|')
  for name, per_update in totals.items():
    if per_update:
      print(
        f'| {name} | {len(per_update)} | {min(per_update)} / '
        f'{statistics.median(per_update):g} / {max(per_update)} |'
      )
    else:
      print(f'| {name} | 0 | - |')


if __name__ == '__main__':
  main()

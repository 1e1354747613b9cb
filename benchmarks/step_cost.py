"""XLA's cost model of a pruned train step against the dense step: bytes, flops, temporaries.

Run from the repository root::

  python -m benchmarks.step_cost                          # MLP 784-2048-2048-10
  python -m benchmarks.step_cost --model transformer --layout scanned

A step without a mask update should cost at most 1.03x the dense step (issue 16), a
difference that wall-clock timings on a shared CPU cannot resolve (they move by 5-20%
between runs). XLA's cost analysis of the compiled step does not move: for the same
jax/XLA version it gives the same figures on every run and every x86 CPU, since it reads
the optimised program, not a clock. For every algorithm this compiles:

- its no-update path: the step with the schedule replaced by ``NoUpdateSchedule``, so
  nothing but the masked optimizer step is traced (what a step without a mask update
  executes; the real step adds the conditional, whose no-update branch passes the
  stored masks through);
- for straight-through algorithms (no schedule of mask updates: masks are recomputed at
  every step), the step itself;

and reports ``bytes accessed`` and ``flops`` (``compiled.cost_analysis()``) and the
temporaries (``compiled.memory_analysis().temp_size_in_bytes``) against the dense step
(adam). Mask-update steps are not reported: XLA counts a ``while`` loop's body once,
whatever its trip count, so the selection's passes are undercounted. For the same reason
a scanned model's layers count as one layer, in the dense step as in the pruned one,
while the optimizer's pass over the stacked leaves counts whole: the scanned ratios
overstate. Bytes are a model of
memory traffic (operands and results of every fused kernel), the first-order cost of these
memory-bound steps on CPU; time them with ``benchmarks.run`` and ``benchmarks.transformer``.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import optax

from benchmarks.compile_time import machine
from benchmarks.search_passes import model_and_step
from prunax import engines
from prunax import sparsity_schedules as sched


def cost(step, params, state, batch) -> tuple[float, float, int]:
  """``(bytes accessed, flops, temporary bytes)`` of ``step`` (a jitted step of
  ``benchmarks.search_passes.model_and_step``) compiled for these inputs, without its
  donation of params and state, for both steps alike."""
  compiled = jax.jit(step.__wrapped__).lower(params, state, batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  temp = compiled.memory_analysis().temp_size_in_bytes
  return float(analysis['bytes accessed']), float(analysis['flops']), int(temp)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp', help='mlp or transformer')
  parser.add_argument('--layout', default='unrolled', help='transformer: unrolled or scanned')
  parser.add_argument('--algorithms', default=None, help='comma-separated (default: all)')
  args = parser.parse_args(argv)
  params, algorithms, make_step, batch = model_and_step(args.model, args.layout)
  names = list(algorithms) if args.algorithms is None else args.algorithms.split(',')
  for name in names:
    if name not in algorithms:
      raise ValueError(f'unknown algorithm {name!r}; choose from {sorted(algorithms)}.')
  where = args.model if args.model == 'mlp' else f'{args.model}, {args.layout}'
  print(f'# XLA cost analysis of a train step against dense ({where}), adam, sparsity 0.9')
  print(f'{machine()}, jax {jax.__version__}\n')
  dense_tx = optax.adam(1e-3)
  dense = cost(make_step(dense_tx), params, dense_tx.init(params), batch)
  print(
    f'dense: {dense[0] / 2**20:.1f} MiB accessed, {dense[1] / 1e9:.3f} GFLOP, '
    f'{dense[2] / 2**20:.2f} MiB temporaries\n'
  )
  print('| algorithm | step | bytes / dense | flops / dense | temporaries MiB (dense) |')
  print('|---|---|---|---|---|')
  for name in names:
    pruner = algorithms[name]
    if pruner.engine is not engines.straight_through:
      changes = {'scheduler': sched.NoUpdateSchedule()}
      if hasattr(pruner, 'drop_fraction_fn'):  # SET, RigL: a decay needs an end step
        changes['drop_fraction_fn'] = 'constant'
      pruner, which = dataclasses.replace(pruner, **changes), 'no update'
    else:
      which = 'every step'
    tx = pruner.wrap_optax(optax.adam(1e-3))
    got = cost(make_step(tx), params, tx.init(params), batch)
    print(
      f'| {name} | {which} | {got[0] / dense[0]:.4f} | {got[1] / dense[1]:.4f} | '
      f'{got[2] / 2**20:.2f} ({dense[2] / 2**20:.2f}) |'
    )


if __name__ == '__main__':
  main()

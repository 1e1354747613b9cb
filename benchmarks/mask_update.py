"""Time of a mask update alone against the dense train step, and its counting passes.

Run from the repository root::

  python -m benchmarks.mask_update                              # MLP 784-2048-2048-10
  python -m benchmarks.mask_update --model transformer --layout unrolled --algorithms set
  python -m benchmarks.mask_update --dtype bfloat16                  # bfloat16 params

A mask-update step costs the step without one plus the mask update (the selection loops,
the packing of the new masks); this times the second part on its own, so that a change
to the selection shows in a figure that the rest of the step does not blur. For each
algorithm (the models, optimizer and schedules of ``benchmarks.search_passes``: Adam,
sparsity 0.9) it runs the train step 10 times from the initial state, then jits the mask
update of that state (``new_masks`` at sparsity 0.9 with the stored masks as the old
ones and the gradients of the batch at those params, then ``store_masks``) and times it
against the dense step (adam), alternated,
fastest of ``--calls`` calls each, over ``--repeats`` repeats. It prints the passes the
update's selection loops ran (:func:`prunax.selection.count_passes`). With ``--dtype
bfloat16`` the params (and so the gradients, Adam's moments and the scores) are bfloat16,
in the dense step too. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax

import prunax
from benchmarks import run
from benchmarks import transformer
from benchmarks.compile_time import machine
from benchmarks.search_passes import UPDATING
from benchmarks.search_passes import model_and_step
from prunax import masks as masks_lib
from prunax import selection


def fastest(fn, args, calls: int) -> float:
  """Milliseconds of the fastest of ``calls`` calls of ``fn(*args)`` (compiled first)."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def loss_of(model: str, layout: str):
  """The loss ``f(params, batch)`` of the benchmark model (``search_passes``' batch)."""
  if model == 'mlp':
    return run.loss_fn
  return transformer.make_loss(transformer.LM(12, scanned=layout == 'scanned'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp', help='mlp or transformer')
  parser.add_argument('--layout', default='unrolled', help='transformer: unrolled or scanned')
  parser.add_argument('--algorithms', default=','.join(UPDATING[:-1]))
  parser.add_argument('--repeats', type=int, default=6)
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(argv)
  params, algorithms, make_step, batch = model_and_step(args.model, args.layout)
  params = jax.tree.map(lambda a: a.astype(args.dtype), params)
  grad = jax.jit(jax.grad(loss_of(args.model, args.layout)))
  dense_tx = optax.adam(1e-3)
  dense_step = make_step(dense_tx)  # donates its inputs: chained on its own outputs
  dense = list(dense_step(run.copy_tree(params), dense_tx.init(params), batch))  # compiles

  def dense_fastest(calls: int) -> float:
    dense[0], dense[1], best = run.run_steps(dense_step, *dense, batch, calls)
    return best * 1e3

  where = args.model if args.model == 'mlp' else f'{args.model}, {args.layout}'
  where += f', {args.dtype} params'
  print(f'# Mask update alone / dense step ({where}), {machine()}, jax {jax.__version__}')
  print(
    '\n| algorithm | passes | update ms (median) | dense step ms (median) '
    '| ratio min / median / max |'
  )
  print('|---|---|---|---|---|')
  for name in args.algorithms.split(','):
    if name not in algorithms:
      raise ValueError(f'unknown algorithm {name!r}; choose from {sorted(algorithms)}.')
    updater = algorithms[name]
    tx = updater.wrap_optax(optax.adam(1e-3))
    step = make_step(tx)
    p, s = run.copy_tree(params), tx.init(params)
    for _ in range(10):
      p, s = step(p, s, batch)
    sparsities = jax.tree.map(lambda m: None if m is None else 0.9, prunax.bool_masks(s, p))

    def update(p, s, g, updater=updater, sparsities=sparsities):
      old = masks_lib.lazy_masks(s.masks, p)
      new = updater.new_masks(p, sparsities, sparse_state=s, grads=g, old_masks=old)
      return updater.store_masks(new, like=s.masks)

    g = grad(p, batch)
    with selection.count_passes() as log:
      update = jax.jit(update)
      jax.block_until_ready(update(p, s, g))
      jax.effects_barrier()
    passes = sum(log.passes(loop) for loop in range(log.loops))
    times, dense_times = [], []
    for _ in range(args.repeats):
      times.append(fastest(update, (p, s, g), args.calls))
      dense_times.append(dense_fastest(args.calls))
    ratios = sorted(t / d for t, d in zip(times, dense_times, strict=True))
    print(
      f'| {name} | {passes} | {statistics.median(times):.1f} | '
      f'{statistics.median(dense_times):.1f} | '
      f'{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f} |',
      flush=True,
    )


if __name__ == '__main__':
  main()

"""The floor of a pruned step's compile time: its threshold searches as one host call.

Run from the repository root::

  python -m benchmarks.selection_floor                          # MLP, 4 and 64 layers
  python -m benchmarks.selection_floor --model transformer --layout unrolled
  python -m benchmarks.selection_floor --update --algorithms magnitude,set,rigl

A mask-updating step compiles its selection's ``while`` loops (the counting passes,
their bookkeeping, the tie-breaks) and everything around them: the scores and their
keys, the threshold masks, the packing of the new masks, the update's branch and the
masks' application. This replaces the loops (``selection._searched_thresholds``, every
array above ``selection._SORT_AT_MOST`` elements) by one ``jax.pure_callback`` that finds
the same thresholds in NumPy (``np.partition``, ties by lowest position: the same masks,
``tests/test_benchmark_selection_floor.py``), which XLA compiles as a single custom call.
What the step still costs to compile then is what no selection, however cheap to
compile, would take away.

For each algorithm (the steps of ``benchmarks.compile_time``: the MLP of 256 x 256
layers, or ``benchmarks.transformer``'s LM; Adam, sparsity 0.9) three train steps are
traced and compiled with caches cleared, alternated in every repeat: dense, pruned, and
pruned with the host selection; ratios to the dense step, min / median / max. With
``--update`` it runs ``benchmarks.mask_update`` (the MLP of the step table) as it is,
then with the host selection: the run time of the same mask updates. A CPU measurement:
the callback's arrays travel to the host, which on an accelerator would cost a copy of
every key. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import compile_time
from benchmarks import mask_update
from benchmarks import transformer
from prunax import selection


def host_cutoffs(k: np.ndarray, *keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(t, t_tie)`` of ``selection._threshold_mask`` for the ``k[i]`` largest of every
  ``keys[i]`` (uint32, positions in flat order; ``1 <= k[i] <= size``): ``t`` the
  ``k[i]``-th largest key, ``t_tie`` keeping the ties at ``t`` up to the last position
  needed (``MAX - position >= t_tie``)."""
  t, t_tie = [], []
  for count, a in zip(np.asarray(k), keys, strict=True):
    flat = np.asarray(a).reshape(-1)
    count = int(count)
    # The grow searches' scores put most weights at one lowest key, where NumPy's
    # selection slows down 10-20x: then only the keys above it are partitioned.
    lowest = flat.min()
    above = flat[flat > lowest] if np.count_nonzero(flat == lowest) > flat.size // 4 else flat
    if count > above.size:
      threshold = lowest
    else:
      threshold = np.partition(above, above.size - count)[above.size - count]
    needed = count - int(np.count_nonzero(flat > threshold))
    last = np.flatnonzero(flat == threshold)[needed - 1]
    t.append(threshold)
    t_tie.append(selection._MAX_KEY - last)
  return np.asarray(t, np.uint32), np.asarray(t_tie, np.uint32)


def host_thresholds(inputs, k, uniform=None, near=None, distinct=False):
  """``selection._searched_thresholds`` by one host call (its hints are not needed)."""
  del uniform, near, distinct
  keys = [selection.sortable_keys(x()) for x in inputs]
  out = (jax.ShapeDtypeStruct((len(inputs),), jnp.uint32),) * 2
  return jax.pure_callback(host_cutoffs, out, k, *keys, vmap_method='sequential')


@contextlib.contextmanager
def host_selection() -> Iterator[None]:
  """Within the block, every threshold search runs on the host (:func:`host_thresholds`)."""
  searched = selection._searched_thresholds
  selection._searched_thresholds = host_thresholds
  try:
    yield
  finally:
    selection._searched_thresholds = searched


def compile_seconds(make_step, tx, params, *args) -> float:
  """Seconds to trace, lower and compile ``make_step(tx)`` (caches cleared)."""
  state = tx.init(params)
  step = make_step(tx)
  jax.clear_caches()
  start = time.perf_counter()
  jax.jit(step).lower(params, state, *args).compile()
  return time.perf_counter() - start


def models(args) -> list[tuple[str, object, dict, tuple, dict]]:
  """``(label, make_step, params, extra step args, updaters)`` of every model measured;
  ``updaters`` maps each algorithm to a function that builds its updater."""
  if args.model == 'mlp':
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 256))
    out = []
    for layers in [int(v) for v in args.layers.split(',')]:

      def make_step(tx):
        def step(p, s):
          g = jax.grad(compile_time.loss)(p, x)
          u, s = tx.update(g, s, p)
          return optax.apply_updates(p, u), s

        return step

      params = compile_time.mlp_params(layers)
      build = {name: lambda name=name: compile_time.updater(name) for name in args.algorithms}
      out.append((f'MLP, {layers} layers', make_step, params, (), build))
    return out
  tokens = transformer.tokens_of(2)
  model, params, layer_axes = transformer.setup(12, args.layout, tokens)
  built = transformer.algorithms(layer_axes)
  build = {name: lambda name=name: built[name][0] for name in args.algorithms}
  make_step = lambda tx: transformer.make_step(model, tx)  # noqa: E731
  return [(f'transformer, {args.layout}', make_step, params, (tokens,), build)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mlp', choices=('mlp', 'transformer'))
  parser.add_argument('--layout', default='unrolled', choices=('unrolled', 'scanned'))
  parser.add_argument('--layers', default='4,64', help='MLP: numbers of 256 x 256 layers')
  parser.add_argument('--algorithms', default='magnitude,set,rigl,magnitude_ste')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--update', action='store_true', help='time the mask updates instead')
  args = parser.parse_args(argv)
  args.algorithms = args.algorithms.split(',')
  if args.update:
    update_args = ['--algorithms', ','.join(args.algorithms), '--repeats', str(args.repeats)]
    mask_update.main(update_args)
    print('\n# the same, the threshold searches on the host')
    with host_selection():
      mask_update.main(update_args)
    return
  print(f'# compile time, searches on the host; jax {jax.__version__}, {compile_time.machine()}')
  print(
    '\n| model | algorithm | dense s | pruned / dense | host selection / dense '
    '| host selection / pruned |'
  )
  print('|---|---|---|---|---|---|')
  for label, make_step, params, extra, updaters in models(args):
    for name, build in updaters.items():
      dense, pruned, host = [], [], []
      for _ in range(args.repeats):
        dense.append(compile_seconds(make_step, optax.adam(1e-3), params, *extra))
        tx = build().wrap_optax(optax.adam(1e-3))
        pruned.append(compile_seconds(make_step, tx, params, *extra))
        with host_selection():
          tx = build().wrap_optax(optax.adam(1e-3))
          host.append(compile_seconds(make_step, tx, params, *extra))
      print(
        f'| {label} | {name} | {statistics.median(dense):.2f} '
        f'| {transformer.fmt([p / d for p, d in zip(pruned, dense, strict=True)])} '
        f'| {transformer.fmt([h / d for h, d in zip(host, dense, strict=True)])} '
        f'| {transformer.fmt([h / p for h, p in zip(host, pruned, strict=True)])} |',
        flush=True,
      )


if __name__ == '__main__':
  main()

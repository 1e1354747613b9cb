"""prunax benchmark suite: every target of the speed/memory issue, as ratios to dense.

Run from the repository root::

  python -m benchmarks.run            # full (about 10-20 minutes on 2 CPU cores)
  python -m benchmarks.run --quick    # smaller sizes, fewer repeats
  python -m benchmarks.run --global-1e9   # 1e9-parameter global pruning, peak RSS (~6 GB)

Each timing is the median of several calls of a jitted function after compilation; each
experiment is repeated ``--repeats`` times and reported as min / median / max of the
ratio to the dense reference measured in the same repeat. No numbers here are asserted:
the tests check correctness, this prints measurements.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunax
from benchmarks.compile_time import machine
from prunax import export
from prunax import selection
from prunax import sparsity_schedules
from prunax import sparsity_types


def timeit(fn, *args, iters: int = 5) -> float:
  """Median seconds of ``fn(*args)`` (blocked) after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def summary(ratios) -> str:
  return f'{min(ratios):6.2f} {statistics.median(ratios):6.2f} {max(ratios):6.2f}'


def environment() -> str:
  return (
    f'jax {jax.__version__}, optax {optax.__version__}, {machine()}, python '
    f'{platform.python_version()}, {time.strftime("%Y-%m-%d")}'
  )


# ----------------------------------------------------------------------------- selection


def bench_selection(sizes, repeats):
  print('\n## Unstructured top-k mask of one tensor vs one elementwise pass (target <= 10x)')
  print(f'{"elements":>10} {"keep":>5}  {"ratio min/med/max":>20}  {"top-k ms":>9} {"pass ms":>8}')
  passes = jax.jit(lambda x: jnp.abs(x) * 2.0)
  for n in sizes:
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (n,)))
    for keep in (0.5, 0.1):
      topk = jax.jit(lambda x, keep=keep: selection.topk_mask(x, int(keep * x.size)))
      ratios, tk, ew = [], [], []
      for _ in range(repeats):
        ew.append(timeit(passes, x))
        tk.append(timeit(topk, x))
        ratios.append(tk[-1] / ew[-1])
      print(
        f'{n:>10.0e} {keep:>5}  {summary(ratios):>20}  {statistics.median(tk) * 1e3:9.2f} '
        f'{statistics.median(ew) * 1e3:8.2f}'
      )


# ------------------------------------------------------------------------- training steps


def mlp(sizes):
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  return {
    f'layer{i}': {'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a), 'bias': jnp.zeros(b)}
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp_batch(sizes, batch_size):
  """A fixed batch ``(inputs, labels)`` for :func:`mlp` of ``sizes``."""
  return (
    jax.random.normal(jax.random.PRNGKey(1), (batch_size, sizes[0])),
    jax.random.randint(jax.random.PRNGKey(2), (batch_size,), 0, sizes[-1]),
  )


def mlp_apply(params, x):
  for i in range(len(params)):
    x = x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias']
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def make_step(tx):
  """A jitted train step that donates params and optimizer state, as real loops do."""

  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def copy_tree(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


def run_steps(step, params, state, batch, calls, count=None):
  """Runs ``calls`` chained steps (the step counter reset to ``count`` before each);
  returns the new params and state and the fastest call's seconds."""
  times = []
  for _ in range(calls):
    if count is not None:
      state = state._replace(count=jnp.int32(count))
    start = time.perf_counter()
    params, state = step(params, state, batch)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
  return params, state, min(times)


# Steps that select masks are timed as training runs them, from this step counter on
# (mask updates every 10 steps: the 4th update).
UPDATE_AT = 40
UPDATE_EVERY = 10
# The step kinds timed, as ``(count, every)``: the counter reset to 11 before each call
# (no mask update), or (count None) training's steps from UPDATE_AT on, every
# UPDATE_EVERY-th (mask update) or every one.
KINDS = {'no mask update': (11, 1), 'mask update': (None, UPDATE_EVERY), 'every step': (None, 1)}


def trained_until(step, params, state, batch, count=UPDATE_AT):
  """``(params, state)`` after training from ``(params, state)`` (step counter 0) until the
  counter reads ``count``: the state a mask update of real training starts from."""
  if int(state.count) != 0:
    raise ValueError(f'trained_until: expected a fresh state (step counter 0), got {state.count}.')
  for _ in range(count):
    params, state = step(params, state, batch)
  return params, state


def run_training_steps(step, params, state, batch, calls, every):
  """Runs ``calls`` steps of training on from ``state``, each followed by the ``every - 1``
  steps to the next one (not timed); returns the new params and state and the fastest
  timed step's seconds.

  Timing consecutive calls with the counter reset to an update step instead (as before
  2026-12-07) ran every mask update one step after the last, with the same random keys
  (they fold the counter): the weights regrown one Adam step before, all of about one
  magnitude, and SET's grow keys correlated with its masks cost SET and RigL 3-5 passes
  more than training's updates take, while magnitude pruning's update, pruning again to
  the sparsity it had reached, took 2 passes, not training's 4-6; the random keys of
  random STE were those of one step, each call."""
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    params, state = step(params, state, batch)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - start)
    for _ in range(every - 1):
      params, state = step(params, state, batch)
  return params, state, min(times)


def time_calls(step, params, state, batch, calls, count, every):
  """``(params, state, seconds)`` of ``calls`` timed steps of a :data:`KINDS` kind
  ``(count, every)``: chained with the counter reset to ``count``
  (:func:`run_steps`), or where ``count`` is None training's own
  (:func:`run_training_steps`)."""
  if count is None:
    return run_training_steps(step, params, state, batch, calls, every)
  return run_steps(step, params, state, batch, calls, count)


def alternated(step, tx, params, batch, dense, dense_step, repeats, kind):
  """Per repeat ``(dense seconds, pruned seconds)``: 3 chained dense steps (``dense``
  holds their params and state, advanced), then 3 pruned steps of ``tx`` of the
  :data:`KINDS` ``kind``, the fastest call of each."""
  count, every = KINDS[kind]
  if count is None:
    p, s = trained_until(step, copy_tree(params), tx.init(params), batch)
  else:
    p, s, _ = run_steps(step, copy_tree(params), tx.init(params), batch, 2, count)
  for _ in range(repeats):
    dense[0], dense[1], d = run_steps(dense_step, dense[0], dense[1], batch, 3)
    p, s, t = time_calls(step, p, s, batch, 3, count, every)
    yield d, t


def algorithms(packed: bool):
  poly = sparsity_schedules.PolynomialSchedule(
    update_freq=10, update_start_step=0, update_end_step=1000
  )
  periodic = sparsity_schedules.PeriodicSchedule(
    update_freq=10, update_start_step=0, update_end_step=1000
  )
  common = dict(sparsity=0.9, packed_masks=packed)
  return {
    'magnitude': (prunax.MagnitudePruning(scheduler=poly, **common), True),
    'global_magnitude': (prunax.GlobalMagnitudePruning(scheduler=poly, **common), True),
    'set': (prunax.SET(scheduler=periodic, **common), True),
    'rigl': (prunax.RigL(scheduler=periodic, **common), True),
    'magnitude_ste': (prunax.SteMagnitudePruning(scheduler=poly, **common), False),
    # N:M 2:4 (its default structure; sparsity 0.5).
    'sr_ste': (prunax.SRSTE(packed_masks=packed), False),
    'autosparse': (prunax.AutoSparse(**common), False),
  }


def bench_steps(sizes, batch_size, repeats, packed):
  """Per-step time / dense step time, dense and pruned steps interleaved.

  Each repeat runs 3 chained dense steps, then 3 chained pruned steps, and keeps the
  fastest call of each (donated buffers, as in a real loop); the reported ratio is over
  repeats (min / median / max). ``no mask update`` steps come from resetting the state's
  step counter before each call; ``mask update`` steps and the straight-through
  algorithms' steps are those of training from init, from :data:`UPDATE_AT` on
  (:data:`KINDS`).
  """
  params = mlp(sizes)
  nparams = sum(x.size for x in jax.tree.leaves(params))
  batch = mlp_batch(sizes, batch_size)
  print(
    f'\n## Training step / dense step, MLP {"-".join(map(str, sizes))} ({nparams / 1e6:.1f}M '
    f'params), batch {batch_size}, Adam, sparsity 0.9, packed_masks={packed}'
  )
  print('   targets: no mask update <= 1.03x; mask update <= 1.5x; STE/SR-STE/AutoSparse <= 1.3x')
  print(f'{"algorithm":<18} {"step kind":<16} {"ratio min/med/max":>20}  {"ms":>8} {"dense ms":>8}')
  dense_tx = optax.adam(1e-3)
  dense_step = make_step(dense_tx)
  dense = list(run_steps(dense_step, copy_tree(params), dense_tx.init(params), batch, 2))
  results = {}
  for name, (pruner, has_updates) in algorithms(packed).items():
    tx = pruner.wrap_optax(optax.adam(1e-3))
    step = make_step(tx)
    kinds = ['every step'] if not has_updates else ['no mask update', 'mask update']
    for kind in kinds:
      ratios, ms, dms = [], [], []
      for d, t in alternated(step, tx, params, batch, dense, dense_step, repeats, kind):
        ratios.append(t / d)
        ms.append(t * 1e3)
        dms.append(d * 1e3)
      results[(name, kind)] = ratios
      print(
        f'{name:<18} {kind:<16} {summary(ratios):>20}  {statistics.median(ms):8.1f} '
        f'{statistics.median(dms):8.1f}',
        flush=True,
      )
    state = tx.init(params)
    masks = prunax.get_sparse_state(state).masks
    mask_bytes = sum(m.nbytes for m in jax.tree.leaves(masks))
    unpruned = lambda x: x is None or isinstance(x, optax.MaskedNode)  # noqa: E731
    pruned_bytes = sum(
      p.nbytes
      for p, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=unpruned), strict=True
      )
      if not unpruned(m)
    )
    print(
      f'{"":<18} mask bytes / params bytes: {mask_bytes / (nparams * 4):.4f} '
      f'(of pruned leaves: {mask_bytes / max(pruned_bytes, 1):.4f})'
    )
  return results


# ------------------------------------------------------------------------- export/inference


def export_ratios(w) -> dict[str, float]:
  """Bytes of ``w`` exported after pruning, over its dense bytes: 90% unstructured as BCOO
  and BCSR, and 2:4 as N:M (selected along :class:`prunax.NByM`'s default axis, the
  one :func:`prunax.export.to_nm` groups by)."""
  keep = selection.topk_mask(jnp.abs(w), int(0.1 * w.size))
  sparse_w = np.asarray(jnp.where(keep, w, 0))
  axis = sparsity_types.nm_default_axis(w.ndim)
  nm = np.asarray(jnp.where(selection.n_by_m_mask(jnp.abs(w), 2, 4, axis=axis), w, 0))
  return {
    'bcoo': export.nbytes(export.to_bcoo(sparse_w)) / w.nbytes,
    'bcsr': export.nbytes(export.to_bcsr(sparse_w)) / w.nbytes,
    'nm_2_4': export.to_nm(nm, 2, 4).nbytes / w.nbytes,
  }


def bench_export(sizes, repeats):
  print('\n## Sparse export sizes (fp32)')
  w = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048))
  ratios = export_ratios(w)
  print(f'BCOO  90% unstructured: {ratios["bcoo"]:.4f} (target <= 0.35)')
  print(f'BCSR  90% unstructured: {ratios["bcsr"]:.4f}')
  print(f'N:M   2:4             : {ratios["nm_2_4"]:.4f} (target <= 0.5625)')

  print(f'\n## Sparse inference, MLP {"-".join(map(str, sizes))} at 90% (BCOO kernels) vs dense')
  params = mlp(sizes)
  pruner = prunax.MagnitudePruning(sparsity=0.9)
  sparse_params, _ = pruner.instant_sparsify(params)
  exported = export.export_params(sparse_params, 'bcoo')
  dense_fn = jax.jit(mlp_apply)

  def sparse_apply(p, x):
    for i in range(len(p)):
      x = export.sparse_matmul(x, p[f'layer{i}']['kernel']) + p[f'layer{i}']['bias']
      if i < len(p) - 1:
        x = jax.nn.relu(x)
    return x

  sparse_fn = jax.jit(sparse_apply)
  print(
    f'params bytes: dense {export.nbytes(sparse_params) / 1e6:.1f} MB, '
    f'BCOO {export.nbytes(exported) / 1e6:.1f} MB'
  )
  for batch in (1, 128):
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, sizes[0]))
    err = float(jnp.max(jnp.abs(sparse_fn(exported, x) - dense_fn(sparse_params, x))))
    ratios = []
    for _ in range(repeats):
      ratios.append(timeit(sparse_fn, exported, x) / timeit(dense_fn, sparse_params, x))
    print(f'batch {batch:>4}: sparse / dense latency {summary(ratios)}  (max |diff| {err:.2e})')


# -------------------------------------------------------------------------------- 1e9


def global_1e9(tensors: int, side: int):
  """Run in a fresh process: peak RSS of global magnitude pruning of a huge tree."""
  code = f"""
import resource, time, jax, jax.numpy as jnp
from prunax import selection
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
keys = jax.random.split(jax.random.PRNGKey(0), {tensors})
make = jax.jit(lambda k: jax.random.normal(k, ({side}, {side})))
params = [make(k) for k in keys]
jax.block_until_ready(params)
base = rss(); nbytes = sum(p.nbytes for p in params)
n = sum(p.size for p in params)
@jax.jit
def prune(params):
  masks = selection.global_topk_masks(params, n // 10, score_fn=jnp.abs)
  return masks
start = time.perf_counter()
masks = jax.block_until_ready(prune(params))
took = time.perf_counter() - start
kept = sum(int(m.sum()) for m in masks)
print(f"params {{n/1e9:.3f}}e9 ({{nbytes/1e9:.2f}} GB); kept {{kept}} "
      f"(exact: {{kept == n // 10}}); "
      f"time {{took:.1f}} s (incl. compile); peak RSS {{rss()/1e9:.2f}} GB = "
      f"{{rss()/nbytes:.2f}}x params bytes (after creating params: {{base/nbytes:.2f}}x)")
"""
  print(f'\n## Global magnitude pruning of {tensors} x {side}x{side} float32 (subprocess)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  print(out.stdout.strip() or out.stderr.strip()[-2000:])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='smaller sizes, fewer repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument(
    '--global-1e9',
    action='store_true',
    help='only the 1e9-parameter global pruning (needs ~6 GB of RAM)',
  )
  parser.add_argument('--global-tensors', type=int, default=60)
  parser.add_argument(
    '--mlp',
    default='784,2048,2048,10',
    help='layer sizes of the training-step MLP (comma-separated)',
  )
  parser.add_argument('--steps-only', action='store_true', help='only the training steps')
  args = parser.parse_args(argv)
  print(f'# prunax benchmarks: {environment()}')
  if args.global_1e9:
    global_1e9(args.global_tensors, 4096)
    return
  repeats = args.repeats or (4 if args.quick else 10)
  sizes = tuple(int(x) for x in args.mlp.split(','))
  if args.steps_only:
    for packed in (False, True):
      bench_steps(sizes, 128, repeats, packed)
    return
  bench_selection(
    [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 4_000_000, 30_000_000], repeats
  )
  for packed in (False, True):
    bench_steps(sizes, 128, repeats, packed)
  bench_export(sizes, repeats)


if __name__ == '__main__':
  main()

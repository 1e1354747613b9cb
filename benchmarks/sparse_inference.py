"""Sparse inference and shrunk models vs dense, measured in the same run.

Run from the repository root::

  python -m benchmarks.sparse_inference            # about 2-4 minutes on 2 CPU cores
  python -m benchmarks.sparse_inference --quick    # fewer repeats

Every row times one ``y = x @ w + b`` of a 2048x2048 layer (the benchmark MLP's hidden
layer), a whole MLP or a scanned stack of layers, jitted, the sparse and dense versions
interleaved within each repeat; ratios are sparse / dense time as min / median / max over
repeats (below 1: the sparse path is faster). Nothing here is asserted; the tests check
that the paths compute the same numbers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import prunax
from benchmarks.run import environment
from benchmarks.run import mlp
from benchmarks.run import mlp_apply
from benchmarks.run import summary
from benchmarks.run import timeit
from prunax import export
from prunax import selection
from prunax import sparse_inference as si
from prunax.sparsity_types import Block

SIDE = 2048
BATCHES = (1, 32, 128)


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
  except OSError:
    return 'unknown CPU'
  return next(
    (line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name')),
    'unknown CPU',
  )


def dense_layer(x, wb):
  return x @ wb[0] + wb[1]


def sparse_layer(x, wb):
  return export.sparse_matmul(x, wb[0]) + wb[1]


def compare(fns: dict, x, repeats: int, iters: int):
  """Per name (other than 'dense'): ratios to dense over repeats, and median ms of each.

  ``fns`` maps names to ``(fn, weights)``; weights are passed as arguments (not closed
  over, which would make them compile-time constants).
  """
  compiled = {k: (jax.jit(f), w) for k, (f, w) in fns.items()}
  jitted = {k: (lambda x, f=f, w=w: f(x, w)) for k, (f, w) in compiled.items()}
  ratios = {k: [] for k in fns if k != 'dense'}
  ms = {k: [] for k in fns}
  for _ in range(repeats):
    times = {k: timeit(f, x, iters=iters) for k, f in jitted.items()}
    for k, t in times.items():
      ms[k].append(t * 1e3)
      if k != 'dense':
        ratios[k].append(t / times['dense'])
  return ratios, {k: statistics.median(v) for k, v in ms.items()}


def block_weight(block, sparsity, seed=0):
  key = jax.random.PRNGKey(seed)
  w = jax.random.normal(key, (SIDE, SIDE)) / np.sqrt(SIDE)
  mask = jax.jit(lambda w: Block(block).mask(jnp.abs(w), sparsity))(w)
  return np.asarray(jnp.where(mask, w, 0))


def bench_block(repeats, iters):
  print(f'\n## Block-sparse {SIDE}x{SIDE} layer (prunax.Block, BlockSparse product) / dense')
  print('   target at 90% and batch 1, 32: <= 0.5x')
  print(
    f'{"block":>6} {"sparsity":>8} {"batch":>5}  {"ratio min/med/max":>20}  {"ms":>7} '
    f'{"dense ms":>8}  {"bytes/dense":>11}'
  )
  b = jnp.zeros(SIDE)
  for bs in (16, 32):
    for sparsity in (0.5, 0.8, 0.9, 0.95):
      w = block_weight((bs, bs), sparsity)
      bw = si.to_block(w, (bs, bs))
      wd = jnp.asarray(w)
      for batch in BATCHES:
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, SIDE))
        fns = {'dense': (dense_layer, (wd, b)), 'block': (sparse_layer, (bw, b))}
        ratios, ms = compare(fns, x, repeats, iters)
        print(
          f'{bs:>6} {sparsity:>8} {batch:>5}  {summary(ratios["block"]):>20}  '
          f'{ms["block"]:7.3f} {ms["dense"]:8.3f}  {bw.nbytes / w.nbytes:11.3f}',
          flush=True,
        )


def bench_conv(repeats, iters):
  channels, size = 256, 16
  print(
    f'\n## Block-sparse 3x3 conv, {channels}->{channels} channels, {size}x{size} images, '
    'SAME (ConvFilter: patches x BlockSparse) / dense lax conv'
  )
  print(
    f'{"block":>6} {"sparsity":>8} {"batch":>5}  {"ratio min/med/max":>20}  {"ms":>7} '
    f'{"dense ms":>8}  {"bytes/dense":>11}'
  )
  b = jnp.zeros(channels)

  def dense_conv(x, wb):
    y = jax.lax.conv_general_dilated(
      x, wb[0], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return y + wb[1]

  def sparse_conv(x, wb):
    return si.conv_matmul(x, wb[0], (1, 1), 'SAME') + wb[1]

  rows = 9 * channels
  for bs in (16, 32):
    for sparsity in (0.8, 0.9):
      w = jax.random.normal(jax.random.PRNGKey(0), (rows, channels)) / np.sqrt(rows)
      mask = jax.jit(
        lambda w, bs=bs, sparsity=sparsity: Block((bs, bs)).mask(jnp.abs(w), sparsity)
      )(w)
      w = np.asarray(jnp.where(mask, w, 0)).reshape(3, 3, channels, channels)
      cw = si.to_conv_filter(w, 'block', (bs, bs))
      for batch in (1, 8):
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, channels))
        fns = {'dense': (dense_conv, (jnp.asarray(w), b)), 'block': (sparse_conv, (cw, b))}
        ratios, ms = compare(fns, x, repeats, iters)
        print(
          f'{bs:>6} {sparsity:>8} {batch:>5}  {summary(ratios["block"]):>20}  '
          f'{ms["block"]:7.3f} {ms["dense"]:8.3f}  {cw.nbytes / w.nbytes:11.3f}',
          flush=True,
        )


def bench_unstructured_nm(repeats, iters):
  print(f'\n## Unstructured 90% and 2:4 {SIDE}x{SIDE} layer, each layout / dense')
  print(
    f'{"pattern":<16} {"layout":<12} {"batch":>5}  {"ratio min/med/max":>20}  {"ms":>8} '
    f'{"dense ms":>8}  {"bytes/dense":>11}'
  )
  b = jnp.zeros(SIDE)
  w = jax.random.normal(jax.random.PRNGKey(0), (SIDE, SIDE)) / np.sqrt(SIDE)
  unstructured = np.asarray(jnp.where(selection.topk_mask(jnp.abs(w), SIDE * SIDE // 10), w, 0))
  nm = np.asarray(jnp.where(selection.n_by_m_mask(jnp.abs(w), 2, 4, 0), w, 0))
  cases = {
    'unstructured 90%': (
      unstructured,
      {'ell': si.to_ell(unstructured), 'bcoo': export.to_bcoo(unstructured)},
    ),
    '2:4 (input axis)': (nm, {'nm': export.to_nm(nm, 2, 4, 0), 'ell': si.to_ell(nm)}),
  }
  for pattern, (dense_w, layouts) in cases.items():
    wd = jnp.asarray(dense_w)
    for batch in BATCHES:
      x = jax.random.normal(jax.random.PRNGKey(1), (batch, SIDE))
      fns = {'dense': (dense_layer, (wd, b))}
      for name, kernel in layouts.items():
        fns[name] = (sparse_layer, (kernel, b))
      ratios, ms = compare(fns, x, repeats, iters)
      for name, kernel in layouts.items():
        print(
          f'{pattern:<16} {name:<12} {batch:>5}  {summary(ratios[name]):>20}  '
          f'{ms[name]:8.3f} {ms["dense"]:8.3f}  {export.nbytes(kernel) / dense_w.nbytes:11.3f}',
          flush=True,
        )


def bench_shrink(repeats, iters):
  sizes = (784, 2048, 2048, 10)
  print(
    f'\n## Shrunk MLP {"-".join(map(str, sizes))}: 50% of hidden channels removed '
    '(prunax.shrink) / dense'
  )
  print('   target: <= 0.6x at batch 1 and 128 (FLOPs ratio ~0.3)')
  print(f'{"batch":>5}  {"ratio min/med/max":>20}  {"ms":>7} {"dense ms":>8}  {"params/dense":>12}')
  params = mlp(sizes)
  x0 = jnp.ones((1, sizes[0]))
  groups = prunax.find_groups(mlp_apply, params, x0)
  masks = prunax.group_masks(groups, params, 0.5)
  shrunk = prunax.shrink(mlp_apply, params, masks, x0)
  ratio = sum(x.size for x in jax.tree.leaves(shrunk.params)) / sum(
    x.size for x in jax.tree.leaves(params)
  )
  for batch in (1, 128):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
    fns = {
      'dense': (lambda x, p: mlp_apply(p, x), params),
      'shrunk': (lambda x, p: shrunk(p, x), shrunk.params),
    }
    ratios, ms = compare(fns, x, repeats, iters)
    print(
      f'{batch:>5}  {summary(ratios["shrunk"]):>20}  {ms["shrunk"]:7.3f} {ms["dense"]:8.3f}'
      f'  {ratio:12.3f}',
      flush=True,
    )


class _ScannedStack:
  """``L`` residual layers ``x + relu(x @ w + b)`` of width ``SIDE // 2`` as one nn.scan."""

  def __new__(cls, layers: int):
    import flax.linen as nn

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return x + nn.relu(nn.Dense(x.shape[-1])(x)), None

    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        scan = nn.scan(
          Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=layers
        )
        return scan(name='layers')(x, None)[0]

    return Stack()


def bench_scanned(repeats, iters, layers=8):
  width = SIDE // 2
  print(
    f'\n## Scanned stack, {layers} layers of {width}x{width} (nn.scan), block-pruned 16x16 at '
    '0.9: export_params(..., layer_axes=) -> sparse_apply / dense apply'
  )
  print('   "stacked": one BlockSparse per stack, sliced by the scan (sparse per layer);')
  print('   "whole": exported without layer_axes, densified inside the apply (before)')
  print(
    f'{"batch":>5}  {"stacked min/med/max":>20}  {"whole min/med/max":>20}  {"stacked ms":>10} '
    f'{"dense ms":>8}  {"bytes/dense":>11}'
  )
  model = _ScannedStack(layers)
  # 'whole' is the dense-stack baseline on purpose: no warning about it.
  warnings.filterwarnings('ignore', 'sparse_apply: .* exported whole')
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, width)))
  axes = {'.*kernel': 0}
  pruner = prunax.MagnitudePruning(
    sparsity_distribution_fn={'.*kernel': 0.9}, sparsity_type=Block((16, 16)), layer_axes=axes
  )
  pruned, _ = jax.jit(pruner.instant_sparsify)(params)
  stacked = export.export_params(pruned, 'block', layer_axes=axes)
  whole = export.export_params(pruned, 'block', filter_fn=lambda name, x: name.endswith('kernel'))
  kernel = pruned['params']['layers']['Dense_0']['kernel']
  ratio = stacked['params']['layers']['Dense_0']['kernel'].nbytes / kernel.nbytes
  for batch in BATCHES:
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, width))
    fns = {
      'dense': (lambda x, p: model.apply(p, x), pruned),
      'stacked': (lambda x, p: export.sparse_apply(model, p, x), stacked),
      'whole': (lambda x, p: export.sparse_apply(model, p, x), whole),
    }
    ratios, ms = compare(fns, x, repeats, iters)
    print(
      f'{batch:>5}  {summary(ratios["stacked"]):>20}  {summary(ratios["whole"]):>20}  '
      f'{ms["stacked"]:10.3f} {ms["dense"]:8.3f}  {ratio:11.3f}',
      flush=True,
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='fewer repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument(
    '--only', choices=('shrink', 'block', 'scanned', 'conv', 'other'), default=None
  )
  args = parser.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 7)
  iters = 5 if args.quick else 10
  print(f'# prunax sparse inference: {environment()}; CPU: {cpu_model()}')
  if args.only in (None, 'shrink'):
    bench_shrink(repeats, iters)
  if args.only in (None, 'block'):
    bench_block(repeats, iters)
  if args.only in (None, 'scanned'):
    bench_scanned(repeats, iters)
  if args.only in (None, 'conv'):
    bench_conv(repeats, iters)
  if args.only in (None, 'other'):
    bench_unstructured_nm(repeats, iters)


if __name__ == '__main__':
  main()

"""Densifying an exported model outside ``jax.jit``: seconds of ``prunax.export.densify``.

Run from the repository root::

  python -m benchmarks.densify               # about 1-2 minutes on 2 CPU cores
  python -m benchmarks.densify --repeats 2 --layout scanned

The transformer LM of ``benchmarks.transformer`` (12 blocks, unrolled or scanned), every
exportable leaf pruned to 90% by magnitude (2:4 along the export's default axis for
``nm``), exported in each format and densified back, bit-exactly, outside a jit, as a user
loading an exported checkpoint does. "cold" is the first call after ``jax.clear_caches()``
(it compiles what it runs), "warm" the call after it; the dense reference is
``jax.device_put`` of the same dense params, timed alike in the same repeat. No time is
asserted (each format's result is checked bit-exact once); ``tests/core/test_export.py``
tests the round trips and the compiles.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import transformer
from benchmarks.sparse_inference import cpu_model
from prunax import export
from prunax import selection

FORMATS = ('bcoo', 'bcsr', 'nm', 'block', 'ell')


def pruned(params, structured: bool):
  """``params`` with every exportable leaf at 90% (or 2:4 along the export's N:M axis)."""

  def prune(path, x):
    if not export._is_exportable(x):
      return x
    w = np.asarray(x)
    if structured:
      keep = selection.n_by_m_mask(jnp.abs(jnp.asarray(w)), 2, 4, export.nm_default_axis(w.ndim))
    else:
      keep = np.abs(w) >= np.quantile(np.abs(w), 0.9)
    return jnp.asarray(np.where(np.asarray(keep), w, 0).astype(w.dtype))

  return jax.tree_util.tree_map_with_path(prune, params)


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--layout', choices=('unrolled', 'scanned'), default='unrolled')
  parser.add_argument('--formats', default=','.join(FORMATS))
  args = parser.parse_args(argv)
  _, params, layer_axes = transformer.setup(12, args.layout, transformer.tokens_of(2))
  params = jax.tree.map(np.asarray, params)
  leaves = sum(export._is_exportable(x) for x in jax.tree.leaves(params))
  print(
    f'# {cpu_model()}, jax {jax.__version__}, transformer LM ({args.layout}, {leaves} '
    f'exported leaves), --repeats {args.repeats}; seconds min / median / max'
  )
  print('| format | cold s | warm s | dense device_put cold s |')
  print('|---|---|---|---|')
  for name in args.formats.split(','):
    tree = pruned(params, name == 'nm')
    exported = export.export_params(tree, name, layer_axes=layer_axes)
    want = [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(tree)]
    cold, warm, dense = [], [], []
    for _ in range(args.repeats):
      jax.clear_caches()
      dense.append(timed(lambda: jax.device_put(params)))
      jax.clear_caches()
      cold.append(timed(lambda e=exported: export.densify(e)))
      warm.append(timed(lambda e=exported: export.densify(e)))
    got = [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(export.densify(exported))]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), name
    cells = ' | '.join(transformer.fmt(xs, 3) for xs in (cold, warm, dense))
    print(f'| {name} | {cells} |', flush=True)


if __name__ == '__main__':
  main()

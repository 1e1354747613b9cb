"""Small arrays: one sort against the search loops (compile and run time), by array size.

Run from the repository root::

  python -m benchmarks.selection_sort                     # 256 .. 65536 elements
  python -m benchmarks.selection_sort --sizes 1024,4096 --leaves 1,8 --repeats 5

For each size and number of leaves (``selection.topk_masks`` of that many arrays of that
size, keeping 10%, scores ``|w|`` computed lazily) the two paths of the selection are
compiled (caches cleared) and run: the sort (``_SORT_AT_MOST`` above the size) and the
search loops (``_SORT_AT_MOST = 0``). Ratios sort / search of compile seconds and of run
time (the fastest of 5 calls), min / median / max over ``--repeats``. ``_SORT_AT_MOST``
is where the sort stops paying. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.compile_time import machine
from prunax import selection


def measure(path: str, xs, calls: int = 5) -> tuple[float, float]:
  limit = selection._SORT_AT_MOST
  selection._SORT_AT_MOST = 2**31 if path == 'sort' else 0
  try:
    ks = tuple(x.size // 10 for x in xs)
    fn = lambda xs: selection.topk_masks([selection.Lazy(jnp.abs, x) for x in xs], ks)
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(xs).compile()
    compile_s = time.perf_counter() - start
  finally:
    selection._SORT_AT_MOST = limit
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(xs))
    best = min(best, time.perf_counter() - start)
  return compile_s, best


def fmt(xs):
  return f'{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='256,1024,4096,16384,65536')
  parser.add_argument('--leaves', default='1,8')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  print(f'# sort vs search loops, keep 10%; jax {jax.__version__}, {machine()}')
  print(f'# _SORT_AT_MOST = {selection._SORT_AT_MOST}\n')
  print(
    '| elements | leaves | compile sort / search | run sort / search | search compile s '
    '| search run ms |'
  )
  print('|---|---|---|---|---|---|')
  for leaves in [int(v) for v in args.leaves.split(',')]:
    for size in [int(v) for v in args.sizes.split(',')]:
      keys = jax.random.split(jax.random.PRNGKey(size), leaves)
      xs = [jax.random.normal(k, (size,)) for k in keys]
      rc, rr, sc, sr = [], [], [], []
      for _ in range(args.repeats):
        search = measure('search', xs)
        sort = measure('sort', xs)
        rc.append(sort[0] / search[0])
        rr.append(sort[1] / search[1])
        sc.append(search[0])
        sr.append(search[1] * 1e3)
      print(
        f'| {size} | {leaves} | {fmt(rc)} | {fmt(rr)} | {statistics.median(sc):.2f} '
        f'| {statistics.median(sr):.3f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()

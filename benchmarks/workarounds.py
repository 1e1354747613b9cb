"""Speed of the compiler workarounds that are about time, not memory.

Run from the repository root::

  python -m benchmarks.workarounds --repeats 7

``fused_sum`` (``prunax._xla_workarounds``) sums AutoSparse's threshold gradient (the
sum of a product of three 2048 x 2048 arrays) as a reduction with two outputs, the sums
of the rows and whether a row holds a NaN, so that XLA's CPU backend keeps the product
in its fused loop instead of storing it for a library kernel. This compares it with a
plain ``jnp.sum`` and with the form it replaced (two float outputs, the sums inside and
outside a mask, in rows of 16: XLA's loop for two float outputs is scalar), and prints
the CPU seconds of each (fastest of 5 calls, median over repeats), their ratios to
``fused_sum`` (min / median / max) and their temporary bytes. Nothing is asserted: the
memory half of the workaround is checked by ``tests/core/test_xla_workarounds.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.compile_time import cpu_model
from prunax import _xla_workarounds


def cpu_seconds(fn, *args, calls: int = 5) -> float:
  """Fastest of ``calls`` calls, in CPU seconds of this process."""
  best = float('inf')
  for _ in range(calls):
    start = time.process_time()
    jax.block_until_ready(fn(*args))
    best = min(best, time.process_time() - start)
  return best


def two_float_sums(x: jax.Array, mask: jax.Array, width: int = 16) -> jax.Array:
  """The sums of ``x`` inside and outside ``mask`` in rows of ``width``, then summed:
  ``fused_sum`` until 2026-12."""
  x, mask = x.reshape(-1, width), mask.reshape(-1, width)
  zero = jnp.zeros_like(x)
  inside, outside = jax.lax.reduce(
    (jnp.where(mask, x, zero), jnp.where(mask, zero, x)),
    (jnp.float32(0), jnp.float32(0)),
    lambda a, b: (a[0] + b[0], a[1] + b[1]),
    (1,),
  )
  return jnp.sum(inside) + jnp.sum(outside)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  g, w = (jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2048, 2048)) < 0.1)

  def product(g, w, m):
    return g * jnp.sign(w) * jnp.where(m, 1.0, 0.75)

  variants = {
    'fused_sum': lambda g, w, m: _xla_workarounds.fused_sum(product(g, w, m)),
    'jnp.sum': lambda g, w, m: jnp.sum(product(g, w, m)),
    'two float sums, rows of 16': lambda g, w, m: two_float_sums(product(g, w, m), m),
  }
  compiled = {name: jax.jit(fn).lower(g, w, mask).compile() for name, fn in variants.items()}
  seconds = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, fn in compiled.items():
      seconds[name].append(cpu_seconds(fn, g, w, mask))
  print(f'# jax {jax.__version__}, {jax.default_backend()}, {cpu_model()}')
  print('| sum | CPU ms (median) | / fused_sum, min / median / max | temporary bytes |')
  print('|---|---|---|---|')
  for name, times in seconds.items():
    ratios = sorted(t / f for t, f in zip(times, seconds['fused_sum'], strict=True))
    temp = compiled[name].memory_analysis().temp_size_in_bytes
    print(
      f'| {name} | {statistics.median(times) * 1e3:.2f} | {ratios[0]:.2f} / '
      f'{statistics.median(ratios):.2f} / {ratios[-1]:.2f} | {temp:,} |'
    )


if __name__ == '__main__':
  main()

"""Speed of the compiler workarounds that are about time, not memory.

Run from the repository root::

  python -m benchmarks.workarounds --repeats 7

``fused_masked_sum`` (``prunax._xla_workarounds``) reduces rows of 16 before its
two-output reduction, because XLA's CPU loop for a two-output reduction is scalar. This
compares it with the same reduction without the rows, on AutoSparse's threshold gradient
(the sum of a product of three 2048 x 2048 arrays), and prints the CPU seconds of each and
the ratio without / with (min / median / max over repeats). Nothing is asserted: the
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  g, w = (jnp.asarray(rng.standard_normal((2048, 2048)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2048, 2048)) < 0.1)

  def product_sum(reduce):
    return jax.jit(lambda g, w, m: reduce(g * jnp.sign(w) * 0.5, m))

  rowed_fn = product_sum(_xla_workarounds.fused_masked_sum)
  unrowed_fn = product_sum(lambda x, m: _xla_workarounds.two_output_sum(x, m, width=x.size))
  jax.block_until_ready((rowed_fn(g, w, mask), unrowed_fn(g, w, mask)))
  rowed, unrowed = [], []
  for _ in range(args.repeats):
    rowed.append(cpu_seconds(rowed_fn, g, w, mask))
    unrowed.append(cpu_seconds(unrowed_fn, g, w, mask))
  ratios = sorted(u / r for u, r in zip(unrowed, rowed, strict=True))
  print(f'# jax {jax.__version__}, {jax.default_backend()}, {cpu_model()}')
  print(
    f'fused_masked_sum rows of 16: with {statistics.median(rowed) * 1e3:.2f} ms, without '
    f'{statistics.median(unrowed) * 1e3:.2f} ms CPU (medians); without / with '
    f'{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}'
  )


if __name__ == '__main__':
  main()

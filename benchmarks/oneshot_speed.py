"""SparseGPT cost of one 4096x4096 layer, as a ratio to the layer's dense forward pass.

Calibration tokens (``--sequences`` x 2048, the paper's 128 x 2048 by default) are
generated chunk by chunk (one 2048-token sequence at a time, the same random inputs for
both measurements), so neither measurement holds them all. Measured per repeat:

* forward: ``x @ W`` over every chunk (outputs reduced to a scalar, not stored);
* calibrate: the Hessian ``2 X^T X / N`` accumulated over the same chunks (float32);
* solve: ``sparsegpt_prune(W, H, 0.5)`` (compiled before timing);

and the ratio (calibrate + solve) / forward, min / median / max over repeats. Peak memory:
the process's peak RSS and the solve's compiled buffer sizes (XLA memory analysis).

    python -m benchmarks.oneshot_speed                    # 128 x 2048 tokens, 3 repeats
    python -m benchmarks.oneshot_speed --sequences 8      # fewer tokens (same solve)
"""

from __future__ import annotations

import argparse
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.oneshot_lm import cpu_model
from prunax import oneshot
from prunax.oneshot import methods

SEQ = 2048


@functools.partial(jax.jit, static_argnums=(1,))
def _chunk(key, width):
  return jax.random.normal(key, (SEQ, width), jnp.float32)


@jax.jit
def _forward(total, key, w):
  return total + jnp.sum(_chunk(key, w.shape[0]) @ w)


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(h, key):
  x = _chunk(key, h.shape[0])
  return h + x.T @ x


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=int, default=4096)
  parser.add_argument('--sequences', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--blocksize', type=int, default=128)
  args = parser.parse_args()

  keys = jax.random.split(jax.random.PRNGKey(0), args.sequences)
  w = jax.random.normal(jax.random.PRNGKey(1), (args.width, args.width)) / np.sqrt(args.width)
  tokens = args.sequences * SEQ

  def forward():
    total = jnp.zeros([])
    for k in keys:
      total = _forward(total, k, w)
    return total.block_until_ready()

  def calibrate():
    h = jnp.zeros((args.width, args.width), jnp.float32)
    for k in keys:
      h = _accumulate(h, k)
    return (2.0 * h / tokens).block_until_ready()

  # Compile everything once outside the timings.
  _forward(jnp.zeros([]), keys[0], w).block_until_ready()
  _accumulate(jnp.zeros((args.width, args.width)), keys[0]).block_until_ready()
  h = calibrate()
  jax.block_until_ready(oneshot.sparsegpt_prune(w, h, 0.5, blocksize=args.blocksize))

  rows = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    forward()
    t1 = time.perf_counter()
    h = calibrate()
    t2 = time.perf_counter()
    jax.block_until_ready(oneshot.sparsegpt_prune(w, h, 0.5, blocksize=args.blocksize))
    t3 = time.perf_counter()
    rows.append((t1 - t0, t2 - t1, t3 - t2))
  rows = np.array(rows)

  counts = jnp.asarray(
    methods._block_zero_counts(0.5, args.width, args.width, args.blocksize), jnp.int32
  )
  compiled = methods._sparsegpt.lower(w, h, counts, 0, 0, args.blocksize, 0.01).compile()
  mem = compiled.memory_analysis()

  def stats(x):
    return f'{np.min(x):.2f} / {np.median(x):.2f} / {np.max(x):.2f}'

  print(
    f'CPU: {cpu_model()}, {jax.device_count()} JAX device(s) {jax.devices()[0].platform}; '
    f'jax {jax.__version__}'
  )
  print(
    f'layer {args.width}x{args.width}, {args.sequences} x {SEQ} = {tokens} tokens, '
    f'blocksize {args.blocksize}, {args.repeats} repeats (min / median / max)'
  )
  print(f'dense forward   s: {stats(rows[:, 0])}')
  print(f'calibrate (H)   s: {stats(rows[:, 1])}')
  print(f'SparseGPT solve s: {stats(rows[:, 2])}')
  print(f'(calibrate + solve) / forward: {stats((rows[:, 1] + rows[:, 2]) / rows[:, 0])}')
  print(f'solve / forward:               {stats(rows[:, 2] / rows[:, 0])}')
  if mem is not None:
    print(
      f'solve buffers: arguments {mem.argument_size_in_bytes / 2**20:.0f} MiB, outputs '
      f'{mem.output_size_in_bytes / 2**20:.0f} MiB, temporaries '
      f'{mem.temp_size_in_bytes / 2**20:.0f} MiB'
    )
  print(f'process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB')


if __name__ == '__main__':
  main()

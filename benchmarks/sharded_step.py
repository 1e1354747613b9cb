"""Model-parallel pruned steps: per-device temporaries and collectives against dense.

Run from the repository root (it starts JAX with 8 CPU devices itself)::

  python -m benchmarks.sharded_step
  python -m benchmarks.sharded_step --layers 4 --d-model 1024 --algorithms magnitude,rigl

A stack of MLP blocks in the Megatron layout: the first layer of each block (``d_model x
4 d_model``) split on its last axis (column parallel), the second (``4 d_model x
d_model``) on its first (row parallel), over 8 devices. For the dense step and each
algorithm's mask-update step (Adam, sparsity 0.9) it prints, from the compiled step
(``jit(step).lower(...).compile()``): the temporaries per device
(``memory_analysis().temp_size_in_bytes``), and each kind of collective with the bytes
of the arrays it moves per call (a collective inside a selection loop runs once per
pass). Nothing is timed or asserted (``tests/core/test_sharding_gathers.py`` checks the
collectives).
"""

from __future__ import annotations

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import prunax  # noqa: E402
from benchmarks.compile_time import machine  # noqa: E402
from prunax import sparsity_schedules as sched  # noqa: E402

COLLECTIVE = re.compile(
  r'= (\([^()]*\)|\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\('
)
BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'u8': 1, 'pred': 1, 'bf16': 2, 'f16': 2, 's8': 1}


def algorithms():
  once = sched.OneShotSchedule(1)
  periodic = sched.PeriodicSchedule(update_freq=1, update_start_step=1, update_end_step=100)
  return {
    'magnitude': prunax.MagnitudePruning(sparsity=0.9, scheduler=once),
    'global_magnitude': prunax.GlobalMagnitudePruning(sparsity=0.9, scheduler=once),
    'set': prunax.SET(sparsity=0.9, scheduler=periodic),
    'rigl': prunax.RigL(sparsity=0.9, scheduler=periodic),
    'magnitude_ste': prunax.SteMagnitudePruning(sparsity=0.9),
  }


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """``{kind: (instructions, bytes of the arrays they move)}`` of a compiled module."""
  found: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for m in COLLECTIVE.finditer(hlo):
    found[m.group(2)][0] += 1
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
      size = int(np.prod([int(d) for d in dims.split(',') if d]))
      found[m.group(2)][1] += size * BYTES.get(dtype, 4)
  return {k: (v[0], v[1]) for k, v in sorted(found.items())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=4, help='MLP blocks (2 leaves each)')
  parser.add_argument('--d-model', type=int, default=1024)
  parser.add_argument('--algorithms', default=','.join(algorithms()))
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit(
      f'needs 8 devices, JAX has {jax.device_count()}: run it in a new process (it sets '
      'XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts)'
    )
  mesh = Mesh(np.array(jax.devices()[:8]), ('model',))
  d = args.d_model
  params, specs = {}, {}
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * args.layers)
  for i in range(args.layers):
    params[f'block{i}_in'] = jax.random.normal(keys[2 * i], (d, 4 * d)) / np.sqrt(d)
    params[f'block{i}_out'] = jax.random.normal(keys[2 * i + 1], (4 * d, d)) / np.sqrt(4 * d)
    specs[f'block{i}_in'], specs[f'block{i}_out'] = P(None, 'model'), P('model', None)
  placed = jax.device_put(params, {n: NamedSharding(mesh, s) for n, s in specs.items()})
  per_device = sum(x.nbytes for x in params.values()) / 8
  print(f'# {machine()}')
  print(
    f'# {args.layers} MLP blocks of {d} x {4 * d} (column parallel) and {4 * d} x {d} (row '
    f'parallel) over 8 devices: params {per_device / 1e6:.1f} MB per device; the largest '
    f'leaf {4 * d * d * 4 / 1e6:.1f} MB unsharded'
  )
  print('| step | temporaries MB per device | collectives (count, MB moved per call) |')
  print('|---|---|---|')
  names = ['dense'] + [n for n in args.algorithms.split(',') if n]
  for name in names:
    tx = optax.adam(1e-3)
    if name != 'dense':
      tx = algorithms()[name].wrap_optax(tx)

    def step(p, s, tx=tx):
      g = jax.tree.map(lambda w: jnp.sin(3.0 * w), p)  # elementwise stand-in gradients
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state = jax.jit(tx.init)(placed)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(placed, state).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
    moved = ', '.join(
      f'{kind} {n} ({b / 1e6:.3f})' for kind, (n, b) in collectives(compiled.as_text()).items()
    )
    print(f'| {name} | {temp:.2f} | {moved or "none"} |', flush=True)


if __name__ == '__main__':
  main()

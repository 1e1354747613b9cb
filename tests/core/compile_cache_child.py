"""One process of tests/core/test_compile_cache.py.

``python compile_cache_child.py CACHE_DIR`` compiles the jitted train steps of
:data:`ALGORITHMS` (Adam, params and state donated) on a small model with a stacked
(scanned) kernel, with JAX's persistent compilation cache in ``CACHE_DIR`` keeping every
compiled program, and prints ``REPORT`` and the JSON list of the names it compiled.
"""

from __future__ import annotations

import json
import sys

SHAPES = {'w1': (24, 64), 'b1': (64,), 'stack': (3, 64, 64), 'head': (64, 16)}
LAYER_AXES = {'stack': 0}
ALGORITHMS = ('magnitude', 'global_magnitude', 'set', 'rigl', 'ste', 'sr_ste')


def updaters():
  import prunax
  from prunax import sparsity_schedules as sched

  every = sched.PeriodicSchedule(2, 0, 10)
  return {
    'magnitude': prunax.MagnitudePruning(
      sparsity=0.8, scheduler=sched.PolynomialSchedule(2, 0, 10), layer_axes=LAYER_AXES
    ),
    'global_magnitude': prunax.GlobalMagnitudePruning(
      sparsity=0.8, scheduler=sched.PolynomialSchedule(2, 0, 10), layer_axes=LAYER_AXES
    ),
    'set': prunax.SET(sparsity=0.8, scheduler=every, layer_axes=LAYER_AXES),
    'rigl': prunax.RigL(sparsity=0.8, scheduler=every, layer_axes=LAYER_AXES),
    'ste': prunax.SteMagnitudePruning(sparsity=0.8, layer_axes=LAYER_AXES),
    'sr_ste': prunax.SRSTE(layer_axes=LAYER_AXES),
  }


def main(cache_dir: str) -> None:
  import jax

  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

  import jax.numpy as jnp
  import optax

  keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
  params = {n: jax.random.normal(k, s) for (n, s), k in zip(SHAPES.items(), keys, strict=True)}
  x = jnp.ones((4, SHAPES['w1'][0]))

  def loss(p):
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p['stack'])[0]
    return jnp.sum((h @ p['head']) ** 2)

  done = []
  for name, updater in updaters().items():
    tx = updater.wrap_optax(optax.adam(1e-3))

    def step(p, s, tx=tx):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s

    state = tx.init(params)
    jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    done.append(name)
  print('REPORT', json.dumps(done), flush=True)


if __name__ == '__main__':
  main(sys.argv[1])

"""Packed masks under model parallelism: the last axis split 2, 4 and 8 ways on 8 CPU devices.

A mask packed along the last axis takes its param's sharding only if every shard of that
axis packs to whole bytes. Here the last axes (200, 100, 72, 40) leave 25, 9 or 5 weights
per shard, and (8, 256) keeps the 32-weight word fast path. For magnitude pruning, RigL
and STE: the state made by a jitted init is sharded like the params, jitted steps keep it
so, and masks, packed bytes and params are bit-identical to one device (the gradients
are elementwise, so no reduction order differs). One child process runs every case.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import prunax
    from prunax import sparsity_schedules as sched

    assert jax.device_count() == 8, jax.devices()

    def spec(x):
      s = list(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else []
      while s and s[-1] is None:
        s.pop()
      return s

    # One mesh of 2 x 2 x 2 devices splits last axes 2, 4 and 8 ways (25, 9 or 5 weights
    # per shard); (8, 256) keeps the 32-weight word fast path.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ('x', 'y', 'z'))
    xyz = ('x', 'y', 'z')
    specs = {'a': P(None, xyz), 'b': P('x', ('y', 'z')), 'c': P(('x', 'y'), 'z'),
             'd': P(None, xyz), 'e': P('y', None, 'x'), 'f': P(None, xyz),
             'g': P(None, xyz)}
    shapes = {'a': (16, 200), 'b': (12, 100), 'c': (8, 72), 'd': (4, 40), 'e': (2, 6, 40),
              'f': (8, 256), 'g': (24, 72)}
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(shapes))
    params = {n: jax.random.normal(keys[i], s) for i, (n, s) in enumerate(shapes.items())}
    noise = {n: np.asarray(jax.random.normal(keys[len(shapes) + i], s))
             for i, (n, s) in enumerate(shapes.items())}

    def grads_of(p):
      # Elementwise in the weights: the same bits on any sharding.
      return jax.tree.map(lambda w, z: jnp.sin(3 * w) + 0.1 * z, p, noise)

    updaters = {
        'magnitude': prunax.MagnitudePruning(
            sparsity=0.7, scheduler=sched.PolynomialSchedule(1, 0, 3)),
        'rigl': prunax.RigL(sparsity=0.7, scheduler=sched.PeriodicSchedule(1, 1)),
        'ste': prunax.SteMagnitudePruning(sparsity=0.7),
    }

    def pruned(tree):
      # Leaves of pruned params only (None or optax.MaskedNode elsewhere).
      return {n: x for n, x in tree.items() if isinstance(x, jax.Array)}

    def run(tx, p, steps=3):
      def step(p, s):
        u, s = tx.update(grads_of(p), s, p)
        return optax.apply_updates(p, u), s
      s = jax.jit(tx.init)(p)
      init_state = prunax.get_sparse_state(s)
      f = jax.jit(step, donate_argnums=(1,))
      for _ in range(steps):
        p, s = f(p, s)
      return init_state, p, s

    ps = jax.device_put(params, {n: NamedSharding(mesh, v) for n, v in specs.items()})
    want = {n: spec(x) for n, x in ps.items()}
    report = {'per_shard': {
        n: ps[n].addressable_shards[0].data.shape[-1] for n in shapes}}
    for name, updater in updaters.items():
      tx = updater.wrap_optax(optax.sgd(0.1))
      _, p1, s1 = run(tx, params)
      packed1 = pruned(prunax.get_sparse_state(s1).masks)
      bool1 = pruned(prunax.bool_masks(s1, p1))
      init_state, p8, s8 = run(tx, ps)
      st8 = prunax.get_sparse_state(s8)
      wrong = []
      for when, st in (('init', init_state), ('step', st8)):
        for kind, tree in (('mask', st.masks), ('dense', st.dense_params)):
          for n, x in pruned(tree or {}).items():
            if spec(x) != want[n]:
              wrong.append(f'{when} {kind} {n}: {spec(x)} != {want[n]}')
      packed8 = pruned(st8.masks)
      bool8 = pruned(prunax.bool_masks(s8, p8))
      report[name] = {
          'wrong_specs': wrong,
          'pruned': sorted(bool8),
          'packed_bytes': {n: x.shape[-1] for n, x in packed8.items()},
          'packed_equal': sorted(packed1) == sorted(packed8) and all(
              np.array_equal(packed1[n], packed8[n]) for n in packed1),
          'masks_equal': all(np.array_equal(bool1[n], bool8[n]) for n in bool1),
          'params_equal': all(np.array_equal(p1[n], p8[n]) for n in p1),
          'sparsity': prunax.summarize_sparsity(p8)['total_sparsity'],
      }
    print('REPORT' + json.dumps(report))
""")

ALGORITHMS = ['magnitude', 'rigl', 'ste']


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-c', SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  line = next(x for x in out.stdout.splitlines() if x.startswith('REPORT'))
  return json.loads(line[len('REPORT') :])


def test_last_axes_are_split_into_shards_that_are_not_whole_bytes(report):
  assert report['per_shard'] == {'a': 25, 'b': 25, 'c': 36, 'd': 5, 'e': 20, 'f': 32, 'g': 9}


@pytest.mark.parametrize('name', ALGORITHMS)
def test_packed_state_is_sharded_like_the_params(report, name):
  r = report[name]
  assert r['pruned'] == ['a', 'b', 'c', 'd', 'e', 'f', 'g'], r
  assert r['wrong_specs'] == [], r
  # Still packed: gcd(d, 8) blocks of ceil(d / gcd(d, 8) / 8) bytes, 32 words for (8, 256).
  assert r['packed_bytes'] == {'a': 32, 'b': 16, 'c': 16, 'd': 8, 'e': 8, 'f': 32, 'g': 16}, r


@pytest.mark.parametrize('name', ALGORITHMS)
def test_packed_masks_and_params_are_bit_identical_to_one_device(report, name):
  r = report[name]
  assert r['packed_equal'] and r['masks_equal'] and r['params_equal'], r
  assert r['sparsity'] > 0.5, r

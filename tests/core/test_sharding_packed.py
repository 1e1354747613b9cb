"""Packed masks under model parallelism: the last axis split 2, 4 and 8 ways on 8 CPU devices.

A mask packed along the last axis takes its param's sharding only if every shard of that
axis packs to whole bytes. Here the last axes (200, 100, 72, 40) leave 25, 9 or 5 weights
per shard, and (8, 256) keeps the 32-weight word fast path. For magnitude pruning, RigL
and STE: the state made by a jitted init is sharded like the params, jitted steps keep it
so, and masks, packed bytes and params are bit-identical to one device (the gradients
are elementwise, so no reduction order differs). One child process runs every case.
"""

import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import base_updater
from tests.core.helpers import eight_device_report

SCRIPT = textwrap.dedent("""
    import dataclasses, json
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
        dense = getattr(st.algorithm_state, 'dense_params', ())
        for kind, tree in (('mask', st.masks), ('dense', dense)):
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

    # Splits a packed mask cannot follow: 3 shards of 25, 8 and 16 weights (the last two
    # are packed in 8 one-byte blocks, which 3 shards cut through). An eager init with
    # placed params stores those masks unpacked, sharded like the param; a jitted init
    # gets the same from packed_masks. (8, 192) splits into whole bytes and stays packed.
    mesh3 = Mesh(np.array(jax.devices()[:3]), ('model',))
    shapes3 = {'u': (16, 75), 'v': (6, 24), 'w': (4, 48), 'x': (8, 192)}
    keys3 = jax.random.split(jax.random.PRNGKey(1), len(shapes3))
    params3 = {n: jax.random.normal(k, s) for k, (n, s) in zip(keys3, shapes3.items())}
    noise = {n: np.asarray(jax.random.normal(k, s))
             for k, (n, s) in zip(keys3[::-1], shapes3.items())}
    ps3 = jax.device_put(params3, NamedSharding(mesh3, P(None, 'model')))

    def run3(tx, p, jit_init, steps=3):
      s = jax.jit(tx.init)(p) if jit_init else tx.init(p)
      init_state = prunax.get_sparse_state(s)
      f = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
          *tx.update(grads_of(p), s, p)))
      for _ in range(steps):
        p, s = f(p, s)
      return init_state, p, s

    three = {}
    for name, updater in updaters.items():
      tx = updater.wrap_optax(optax.sgd(0.1))
      _, p1, s1 = run3(tx, params3, jit_init=False)
      bool1 = prunax.bool_masks(s1, p1)
      by_map = dataclasses.replace(updater, packed_masks={'u|v|w': False})
      for mode, tx_, jit_init in (
          ('eager', tx, False), ('jit', by_map.wrap_optax(optax.sgd(0.1)), True),
          ('jit_packed', tx, True)):
        init_state, p3, s3 = run3(tx_, ps3, jit_init)
        st3 = prunax.get_sparse_state(s3)
        wrong = [f'{when} {n}: {spec(x)}'
                 for when, st in (('init', init_state), ('step', st3))
                 for n, x in pruned(st.masks).items() if spec(x) != [None, 'model']]
        bool3 = prunax.bool_masks(s3, p3)
        three[f'{name}/{mode}'] = {
            'wrong_specs': wrong,
            'specs': {n: spec(x) for n, x in pruned(st3.masks).items()},
            'stored': {n: [x.shape[-1], str(x.dtype)] for n, x in pruned(st3.masks).items()},
            'masks_equal': all(np.array_equal(bool1[n], bool3[n]) for n in shapes3),
            'params_equal': all(np.array_equal(p1[n], p3[n]) for n in shapes3),
        }
    report['three_way'] = three
    print('REPORT' + json.dumps(report))
""")

ALGORITHMS = ['magnitude', 'rigl', 'ste']


@pytest.fixture(scope='module')
def report():
  return eight_device_report(SCRIPT, timeout=600)


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


@pytest.mark.parametrize('mode', ['eager', 'jit'])
@pytest.mark.parametrize('name', ALGORITHMS)
def test_masks_a_packing_cannot_follow_are_stored_unpacked_and_sharded(report, name, mode):
  # Eager init finds the 3-way splits itself; a jitted init is told by packed_masks.
  r = report['three_way'][f'{name}/{mode}']
  assert r['wrong_specs'] == [], r
  assert r['stored'] == {
    'u': [75, 'uint8'],
    'v': [24, 'uint8'],
    'w': [48, 'uint8'],
    'x': [24, 'uint8'],  # 192 weights packed into 24 bytes: 3 shards of 8 bytes
  }, r
  assert r['masks_equal'] and r['params_equal'], r


@pytest.mark.parametrize('name', ALGORITHMS)
def test_jitted_init_not_told_keeps_packed_masks_replicated_over_the_split(report, name):
  # A jitted init cannot see the 3-way splits: the packed masks of u, v and w are not
  # split over 'model' (each device holds the whole packed mask, 1/32 of the param's
  # bytes at fp32), and training is exactly the same as on one device.
  r = report['three_way'][f'{name}/jit_packed']
  assert r['stored'] == {
    'u': [10, 'uint8'],
    'v': [8, 'uint8'],
    'w': [8, 'uint8'],
    'x': [24, 'uint8'],
  }, r
  assert {n: r['specs'][n] for n in 'uvw'} == {n: [] for n in 'uvw'}, r
  assert r['specs']['x'] == [None, 'model'], r
  assert r['masks_equal'] and r['params_equal'], r


# Jitted: one compile per shape (eagerly, each of their operations compiles per shape).
_pack = jax.jit(base_updater.pack_mask)
_unpack = jax.jit(base_updater.unpack_mask, static_argnums=1)


@hypothesis.settings(deadline=None, max_examples=150)
@hypothesis.given(d=st.integers(1, 400), shards=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_packing_aligned_is_whether_shards_pack_on_their_own(d, shards, seed):
  # Brute force: a split is aligned iff the packed mask splits into as many equal parts,
  # part j being exactly the bits of shard j (so a device can hold its own bytes).
  mask = np.random.default_rng(seed).random((3, d)) < 0.5
  packed = np.asarray(_pack(mask))
  brute = False
  if d % shards == 0 and packed.shape[-1] % shards == 0:
    n, b = d // shards, packed.shape[-1] // shards
    bits = np.asarray(_unpack(packed, mask.shape))
    # The bytes of part j decode to the weights of shard j (and nothing else) for every
    # mask: check with this mask and with each single weight set (row i of the identity).
    single = np.asarray(_pack(np.eye(d, dtype=bool)))
    cols = np.arange(d)
    brute = all(
      np.array_equal(
        single[:, j * b : (j + 1) * b].any(axis=1), (j * n <= cols) & (cols < (j + 1) * n)
      )
      for j in range(shards)
    ) and np.array_equal(bits, mask)
  assert base_updater.packing_aligned(d, shards) == brute


def test_packed_masks_per_leaf_by_name_or_regex():
  params = {'a': jnp.ones((4, 64)), 'b': jnp.ones((4, 64)), 'c': jnp.ones((4, 64))}
  tx = prunax.MagnitudePruning(sparsity=0.5, packed_masks={'a': False, '[bc]': True}).wrap_optax(
    optax.sgd(0.1)
  )
  _, state = tx.update(params, tx.init(params), params)  # the one-shot pruning step
  stored = prunax.get_sparse_state(state).masks
  assert {n: m.shape for n, m in stored.items()} == {'a': (4, 64), 'b': (4, 8), 'c': (4, 8)}
  # The compat apply_masks tells each leaf's layout from its shape.
  upd = prunax.MagnitudePruning(sparsity=0.5)
  out = upd.apply_masks(params, stored, is_packed=None)
  assert all(float(jnp.sum(x)) == 128.0 for x in out.values()), out


@pytest.mark.parametrize(
  'value, error',
  [
    ({1: False}, 'keys must be parameter names or regexes'),
    ({'a': 'no'}, "packed_masks\\['a'\\]"),
    ('no', 'packed_masks'),
  ],
)
def test_packed_masks_rejects_bad_values(value, error):
  with pytest.raises((TypeError, ValueError), match=error):
    prunax.MagnitudePruning(sparsity=0.5, packed_masks=value)


def test_packed_masks_with_conflicting_patterns_names_the_parameter():
  upd = prunax.MagnitudePruning(sparsity=0.5, packed_masks={'a.*': False, '.*b': True})
  with pytest.raises(ValueError, match="'ab'"):
    upd.packs('ab')
  assert upd.packs('zz') is True and upd.packs('ax') is False

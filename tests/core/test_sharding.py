"""Sharded params on 8 CPU devices: state sharded like the params, same results.

XLA's device count is fixed when JAX starts, so the 8-device run happens in a child
process with ``--xla_force_host_platform_device_count=8``.
"""

import textwrap

import numpy as np
import pytest

from tests.core.helpers import eight_device_report

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import prunax
    from prunax import sparsity_schedules as sched

    assert jax.device_count() == 8, jax.devices()

    def _spec(x):
      if not isinstance(x.sharding, NamedSharding):
        return repr(x.sharding)  # e.g. all on one device
      spec = list(x.sharding.spec)
      while spec and spec[-1] is None:  # P('model') == P('model', None)
        spec.pop()
      return spec
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {'w1': jax.random.normal(k[0], (64, 128)) / 8, 'b1': jnp.zeros(128),
              'w2': jax.random.normal(k[1], (128, 32)) / 11}
    x = jax.random.normal(k[2], (16, 64))

    def loss(p):
      return jnp.mean((jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2']) ** 2)

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
    specs = {'w1': P('data', 'model'), 'b1': P('model'), 'w2': P('model', None)}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    report = {}

    def one_and_eight(tx, params, shardings, loss, steps):
      # (params, state) after `steps` jitted steps, on one device and sharded.
      def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      results = []
      for sharded in (False, True):
        p = jax.device_put(params, shardings) if sharded else params
        s = jax.jit(tx.init)(p)
        f = jax.jit(step, donate_argnums=(1,))
        for _ in range(steps):
          p, s = f(p, s)
        results.append((p, s))
      return results

    for name, updater in {
        'magnitude': prunax.MagnitudePruning(
            sparsity=0.8, scheduler=sched.PolynomialSchedule(1, 0, 3)),
        'ste': prunax.SteMagnitudePruning(sparsity=0.7),
        'rigl': prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 1)),
        # Gradual: its keys of weights pruned before go last, the uniform ones counted.
        'random': prunax.RandomPruning(
            sparsity=0.8, scheduler=sched.PolynomialSchedule(1, 0, 3)),
        'global_packed': prunax.GlobalMagnitudePruning(
            sparsity=0.6, packed_masks=True, scheduler=sched.OneShotSchedule(1)),
    }.items():
      tx = updater.wrap_optax(optax.adam(1e-2))
      (p1, s1), (p8, s8) = one_and_eight(tx, params, shardings, loss, 5)
      m1 = prunax.unpack_masks(prunax.get_sparse_state(s1).masks, params)
      m8 = prunax.unpack_masks(prunax.get_sparse_state(s8).masks, params)
      masks_equal = all(bool((a == b).all())
                        for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)))
      # Data-parallel sums are reduced in another order: compare with a gap relative to
      # each leaf's scale (Adam normalises tiny gradients, so elementwise relative gaps of
      # near-zero weights are noise).
      gap = max(float(jnp.max(jnp.abs(a - b)) / (1e-6 + jnp.max(jnp.abs(a))))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
      st = prunax.get_sparse_state(s8)
      state_specs = {
          'mask_w1': _spec(st.masks['w1']),
          'mask_w2': _spec(st.masks['w2']),
          'param_w1': _spec(p8['w1']),
          'mu_w1': _spec(jax.tree.leaves(st.inner_state)[1]),
      }
      if getattr(st.algorithm_state, 'dense_params', ()):  # dense weights kept (STE)
        state_specs['dense_w1'] = _spec(st.algorithm_state.dense_params['w1'])
      if name == 'global_packed':
        # Each stored mask committed to a device of its own: read outside jit, they are
        # unpacked one by one (one program would refuse arrays on several devices).
        apart = {n: jax.device_put(m, jax.devices()[i])
                 for i, (n, m) in enumerate(prunax.get_sparse_state(s1).masks.items())}
        m_apart = prunax.unpack_masks(apart, params)
        report['masks_apart_equal'] = all(
            m_apart[n] is None if m1[n] is None else bool((m_apart[n] == m1[n]).all())
            for n in m1)
      report[name] = {'masks_equal': masks_equal, 'max_gap': gap,
                      'sparsity': prunax.summarize_sparsity(p8)['total_sparsity'],
                      'specs': state_specs}
    # Stacked (scanned) layers split over both mesh axes: every layer selected on its
    # own, STE's last thresholds kept per layer.
    stacked = {'blocks': jax.random.normal(k[0], (3, 64, 64)) / 8,
               'head': jax.random.normal(k[1], (64, 32)) / 8}
    stacked_shardings = {'blocks': NamedSharding(mesh, P(None, 'data', 'model')),
                         'head': NamedSharding(mesh, P('model', None))}

    def stacked_loss(p):
      h = x
      for i in range(3):
        h = jnp.tanh(h @ p['blocks'][i])
      return jnp.mean((h @ p['head']) ** 2)

    axes = {'blocks': 0}
    for name, updater in {
        'ste_stacked': prunax.SteMagnitudePruning(sparsity=0.7, layer_axes=axes),
        'rigl_stacked': prunax.RigL(
            sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 1), layer_axes=axes),
    }.items():
      tx = updater.wrap_optax(optax.adam(1e-2))
      (p1, s1), (p8, s8) = one_and_eight(tx, stacked, stacked_shardings, stacked_loss, 4)
      m1 = prunax.bool_masks(s1, stacked)
      m8 = prunax.bool_masks(s8, stacked)
      st = prunax.get_sparse_state(s8)
      entry = {
          'masks_equal': all(bool((m1[n] == m8[n]).all()) for n in m1),
          'layer_kept': [int(m8['blocks'][i].sum()) for i in range(3)],
          'specs': {'param': _spec(p8['blocks']), 'mask': _spec(st.masks['blocks'])},
      }
      if name == 'ste_stacked':
        entry['specs']['dense'] = _spec(st.algorithm_state.dense_params['blocks'])
        rows = np.asarray(st.algorithm_state.last_thresholds)
        entry['rows'] = rows.tolist()
      report[name] = entry
    # The state of a jitted init, before any step (masks that do not depend on the weights:
    # all ones, random RigL masks), is sharded like the params without shardings passed in.
    sharded = jax.device_put(params, shardings)
    report['init'] = {}
    for name, updater in {
        'magnitude': prunax.MagnitudePruning(sparsity=0.8),
        'rigl': prunax.RigL(sparsity=0.8),
        'ste': prunax.SteMagnitudePruning(sparsity=0.7),
        'autosparse': prunax.AutoSparse(),
        'global_magnitude': prunax.GlobalMagnitudePruning(sparsity=0.6),
    }.items():
      st = prunax.get_sparse_state(jax.jit(updater.wrap_optax(optax.adam(1e-2)).init)(sharded))
      dense = getattr(st.algorithm_state, 'dense_params', ())
      report['init'][name] = {
          f'{kind}_{n}': _spec(x)
          for kind, tree in (('mask', st.masks), ('dense', dense))
          for n, x in (tree or {}).items() if isinstance(x, jax.Array)}  # pruned leaves only
    print('REPORT' + json.dumps(report))
""")


@pytest.fixture(scope='module')
def report():
  return eight_device_report(SCRIPT, timeout=900)


@pytest.mark.parametrize('name', ['magnitude', 'ste', 'rigl', 'random', 'global_packed'])
def test_eight_devices_match_one(report, name):
  r = report[name]
  assert r['masks_equal'], r
  assert r['max_gap'] < 1e-3, r
  assert r['sparsity'] > 0.3


def test_masks_on_several_devices_are_unpacked_outside_jit(report):
  assert report['masks_apart_equal'] is True


@pytest.mark.parametrize('name', ['magnitude', 'ste', 'rigl'])
def test_state_is_sharded_like_the_params(report, name):
  specs = report[name]['specs']
  expected = ['data', 'model']
  assert specs['param_w1'] == expected
  assert specs['mask_w1'] == expected, specs
  assert specs['mask_w2'] == ['model'], specs
  if 'dense_w1' in specs:
    assert specs['dense_w1'] == expected, specs


@pytest.mark.parametrize('name', ['ste_stacked', 'rigl_stacked'])
def test_stacked_layers_split_over_the_mesh_match_one_device(report, name):
  # A (layers, in, out) kernel split over both mesh axes: the same masks as on one
  # device, every layer at its own sparsity, the state sharded like the params, and STE's
  # last thresholds kept for the head and each of the 3 layers.
  r = report[name]
  assert r['masks_equal'], r
  kept = 64 * 64 - round(64 * 64 * (0.7 if name == 'ste_stacked' else 0.8))
  assert r['layer_kept'] == [kept] * 3, r
  assert r['specs']['param'] == [None, 'data', 'model'], r
  assert r['specs']['mask'] == [None, 'data', 'model'], r
  if name == 'ste_stacked':
    assert r['specs']['dense'] == [None, 'data', 'model'], r
    rows = np.array(r['rows'])
    assert rows.shape == (4, 4), rows  # 3 layers of 'blocks', then 'head'
    assert (rows[:, 0] > 0).all() and (rows[:3, 1] == kept).all(), rows


@pytest.mark.parametrize('name', ['magnitude', 'rigl', 'ste', 'autosparse', 'global_magnitude'])
def test_jitted_init_state_is_sharded_like_the_params(report, name):
  specs = report['init'][name]
  expected = {'mask_w1': ['data', 'model'], 'mask_w2': ['model']}
  if name in ('ste', 'autosparse'):
    expected.update(dense_w1=['data', 'model'], dense_w2=['model'])
  assert specs == expected

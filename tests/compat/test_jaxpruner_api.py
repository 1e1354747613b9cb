"""`import prunax as jaxpruner`: jaxpruner's documented API, checked with our own numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax as jaxpruner


def _tree():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  return {
    'Dense_0': {'kernel': jax.random.normal(k1, (6, 10)), 'bias': jnp.ones(10)},
    'Dense_1': {'kernel': jax.random.normal(k2, (10, 4)), 'bias': jnp.ones(4)},
  }


def test_partial_distribution_means_that_sparsity():
  dist = functools.partial(jaxpruner.sparsity_distributions.uniform, sparsity=0.7)
  pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist)
  assert pruner.sparsity == 0.7
  assert pruner == jaxpruner.MagnitudePruning(sparsity=0.7)  # same updater, same jit cache
  sparse, masks = pruner.instant_sparsify(_tree())
  # round(0.7 * 60) = 42 and round(0.7 * 40) = 28 zeros; biases (1-D) stay dense.
  assert int(jnp.sum(sparse['Dense_0']['kernel'] == 0)) == 42
  assert int(jnp.sum(sparse['Dense_1']['kernel'] == 0)) == 28
  assert masks['Dense_0']['bias'] is None
  with pytest.raises(ValueError, match='give the target once'):
    jaxpruner.MagnitudePruning(sparsity=0.5, sparsity_distribution_fn=dist)


def test_params_only_distribution_and_none():
  def custom(params, sparsity=0.75):  # jaxpruner's colab form: fn(params)
    return {k: 0.25 if k == 'pos' else sparsity for k in params}

  params = {'pos': jnp.arange(1.0, 17.0).reshape(4, 4), 'neg': -jnp.arange(1.0, 17.0)}
  _, masks = jaxpruner.MagnitudePruning(sparsity_distribution_fn=custom).instant_sparsify(params)
  assert int(jnp.sum(~masks['pos'])) == 4 and int(jnp.sum(~masks['neg'])) == 12
  dense = jaxpruner.MagnitudePruning(sparsity_distribution_fn=None)
  out, masks = dense.instant_sparsify(params)
  assert masks == {'pos': None, 'neg': None} and bool(jnp.all(out['neg'] == params['neg']))


def test_schedule_methods():
  targets = {'a': 0.8, 'b': None}
  poly = jaxpruner.sparsity_schedules.PolynomialSchedule(
    update_freq=4, update_start_step=0, update_end_step=16
  )
  # Step 9: last update at 8, progress 8/16: 0.8 * (1 - 0.5 ** 3) = 0.7.
  out = poly.get_sparsity_at_step(targets, 9)
  assert out['b'] is None and float(out['a']) == pytest.approx(0.7)
  assert bool(poly.is_mask_update_iter(12)) and not bool(poly.is_mask_update_iter(13))
  assert poly.is_mask_update_iter(None) is False
  assert jaxpruner.sparsity_schedules.NoUpdateSchedule().get_sparsity_at_step(targets, 5) == (
    targets
  )
  periodic = jaxpruner.sparsity_schedules.PeriodicSchedule(3, 0, 9)
  assert [bool(periodic.is_mask_update_iter(s)) for s in range(7)] == [
    True,
    False,
    False,
    True,
    False,
    False,
    True,
  ]


def test_rng_seed_key_and_int():
  params = {'w': jnp.ones((16, 16))}
  dist = functools.partial(jaxpruner.sparsity_distributions.uniform, sparsity=0.5)
  a = jaxpruner.RandomPruning(sparsity_distribution_fn=dist, rng_seed=jax.random.PRNGKey(5))
  b = jaxpruner.RandomPruning(sparsity_distribution_fn=dist, rng_seed=jax.random.PRNGKey(6))
  c = jaxpruner.RandomPruning(sparsity_distribution_fn=dist, rng_seed=jax.random.PRNGKey(5))
  ma, mb, mc = (u.instant_sparsify(params)[1]['w'] for u in (a, b, c))
  assert bool(jnp.all(ma == mc)) and not bool(jnp.all(ma == mb))
  assert hash(a) == hash(c)  # the key is stored as data: still a static jit argument
  assert jaxpruner.RandomPruning(sparsity=0.5, rng_seed=7).seed == 7
  state = a.wrap_optax(optax.sgd(0.1)).init(params)
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(5))


def test_summary_keys():
  tree = {'k': jnp.array([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0]]), 'b': jnp.array([0.0, 3.0])}
  s = jaxpruner.summarize_sparsity(tree, only_total_sparsity=True)
  assert 'sparsity/k' not in s
  assert (s['_nparams'], s['_nparams_nnz']) == (8.0, 3.0)
  assert s['_total_sparsity'] == pytest.approx(5 / 8)
  full = jaxpruner.utils.summarize_sparsity({**tree, 'none': None})
  assert full['none'] is None and float(full['k']) == pytest.approx(4 / 6)
  assert float(full['b']) == pytest.approx(0.5)
  m1 = {'x': jnp.array([1, 1, 1, 0]), 'y': jnp.array([0, 0])}
  m2 = {'x': jnp.array([1, 0, 1, 1]), 'y': jnp.array([1, 1])}
  assert jaxpruner.summarize_intersection(m1, m2)['_total_intersection'] == pytest.approx(2 / 3)
  only = jaxpruner.utils.summarize_intersection(m1, m2, only_total_intersection=True)
  assert list(only) == ['_total_intersection'] and float(only['_total_intersection']) == (
    pytest.approx(2 / 3)
  )


def test_tuple_path_custom_map_and_indexed_filter():
  params = _tree()
  dist = functools.partial(
    jaxpruner.sparsity_distributions.erk,
    sparsity=0.6,
    custom_sparsity_map={('Dense_1', 'kernel'): 0.25},
    filter_fn=jaxpruner.sparsity_distributions.KERNEL_FILTER_FN,
  )
  targets = jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist).target_sparsities(params)
  assert targets['Dense_1']['kernel'] == 0.25 and targets['Dense_0']['bias'] is None
  # ERK over Dense_0/kernel alone: exactly the target.
  assert targets['Dense_0']['kernel'] == pytest.approx(0.6)
  by_tuple = jaxpruner.sparsity_distributions.uniform(
    params, 0.5, filter_fn=lambda key, p: key[0] == 'Dense_0' and key[-1] == 'kernel'
  )
  assert by_tuple['Dense_0']['kernel'] == 0.5 and by_tuple['Dense_1']['kernel'] is None


def test_get_sparsities_erdos_renyi_formula():
  shapes = {'a': (4, 6), 'b': (10, 20)}
  out = jaxpruner.sparsity_distributions.get_sparsities_erdos_renyi(shapes, 0.5)
  # eps = (0.5 * 224) / (10 + 30) = 2.8 makes a's density 2.8 * 10/24 > 1: a is dense, and
  # b alone holds the budget: eps = (0.5 * 200 - 0.5 * 24) / 30, density eps * 30/200.
  assert out['a'] == 0.0
  assert out['b'] == pytest.approx(1 - (88 / 30) * (30 / 200))


class _Scaled(jaxpruner.MagnitudePruning):
  """Scores |w| * scale, with scale given to update()/instant_sparsify()."""

  def calculate_scores(self, params, sparse_state=None, grads=None, scale=None, **kwargs):
    return jax.tree.map(lambda p, s: jnp.abs(p) * s, params, scale)


def test_kwargs_reach_calculate_scores():
  params = {'w': jnp.ones((2, 4))}
  scale = {'w': jnp.array([[1.0, 5.0, 2.0, 7.0], [3.0, 8.0, 4.0, 6.0]])}
  pruner = _Scaled(sparsity=0.5)
  _, masks = pruner.instant_sparsify(params, scale=scale)
  np.testing.assert_array_equal(masks['w'], scale['w'] > 4.5)
  tx = pruner.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params, scale=scale)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['w'] != 0, scale['w'] > 4.5)


def test_block_on_1d_leaf():
  scores = jnp.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.5, 0.6, 0.4])
  mask = jaxpruner.sparsity_types.Block((2, 3)).mask(scores, 1 / 3)
  # Blocks of 3 along the only axis: means 0.8, 0.2, 0.5 -> the 0.2 block goes.
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0, 1, 1, 1])


def test_config_keys_registry_and_passthrough():
  assert 'rigl' in jaxpruner.ALGORITHM_REGISTRY and 'set' in jaxpruner.all_algorithm_names()
  pruner = jaxpruner.create_updater_from_config(
    {
      'algorithm': 'magnitude',
      'sparsity': 0.95,
      'dist_type': 'erk',
      'update_freq': 10,
      'update_start_step': 0,
      'update_end_step': 0,
      'skip_gradients': True,
      'use_packed_masks': False,
    }
  )
  assert pruner.skip_gradients and not pruner.packed_masks
  assert isinstance(pruner.scheduler, jaxpruner.sparsity_schedules.OneShotSchedule)
  with pytest.warns(UserWarning, match='global threshold'):
    glob = jaxpruner.create_updater_from_config(
      {'algorithm': 'global_magnitude', 'sparsity': 0.9, 'dist_type': 'erk'}
    )
  assert glob.sparsity_distribution_fn is jaxpruner.sparsity_distributions.uniform
  with pytest.raises(ValueError, match='dist_type'):
    jaxpruner.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'dist_type': 'gaussian'}
    )
  with pytest.raises(ValueError, match='Unknown sparsity config keys'):
    jaxpruner.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'spasity_typo': 1}
    )


def test_skip_gradients_holds_weights_on_update_steps():
  params = {'w': jnp.arange(1.0, 9.0).reshape(2, 4)}
  grads = {'w': jnp.full((2, 4), 0.5)}
  for skip in (False, True):
    pruner = jaxpruner.MagnitudePruning(
      sparsity=0.5,
      skip_gradients=skip,
      scheduler=jaxpruner.sparsity_schedules.OneShotSchedule(target_step=0),
    )
    tx = pruner.wrap_optax(optax.sgd(1.0, momentum=0.9))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    moved = 0.0 if skip else -0.5
    np.testing.assert_allclose(new['w'], jnp.where(params['w'] > 4, params['w'] + moved, 0))
    trace = state.inner_state[0].trace['w']
    # Step 0 masks gradients with the initial (all-ones) masks: 8 x 0.5 enter the trace.
    assert float(jnp.abs(trace).sum()) == (0.0 if skip else 4.0)
  with pytest.raises(ValueError, match='STE'):
    jaxpruner.SteMagnitudePruning(sparsity=0.5, skip_gradients=True)


def test_jaxpruner_methods_and_flags():
  dist = functools.partial(jaxpruner.sparsity_distributions.uniform, sparsity=0.5)
  pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist)
  assert pruner.is_sparse_gradients is True and callable(pruner.topk_fn)
  assert jaxpruner.SteMagnitudePruning(sparsity=0.5).is_sparse_gradients is False
  with pytest.raises(ValueError, match='is_sparse_gradients'):
    jaxpruner.MagnitudePruning(sparsity=0.5, is_sparse_gradients=False)
  scores = {'w': jnp.array([[0.3, 0.1], [0.4, 0.2]])}
  masks = pruner.create_masks(scores, {'w': 0.5})
  assert masks['w'].dtype == jnp.uint8
  np.testing.assert_array_equal(masks['w'], [[1, 0], [1, 0]])
  np.testing.assert_array_equal(pruner.topk_fn(scores['w'], 0.75), [[0, 0], [1, 0]])
  np.testing.assert_allclose(pruner.apply_masks(scores, masks)['w'], [[0.3, 0.0], [0.4, 0.0]])
  first_two = lambda s, sparsity: jnp.arange(s.size).reshape(s.shape) < 2
  custom = jaxpruner.MagnitudePruning(sparsity=0.5, topk_fn=first_two)
  np.testing.assert_array_equal(custom.instant_sparsify(scores)[1]['w'], [[1, 1], [0, 0]])
  state = pruner.init_state(scores)
  assert pruner.get_initial_masks(scores, {'w': 0.5})['w'].dtype == jnp.uint8
  new_state = pruner.update_state(state, scores, None)
  np.testing.assert_array_equal(
    jaxpruner.unpack_masks(new_state.masks, scores)['w'], [[True, False], [True, False]]
  )
  np.testing.assert_allclose(
    jaxpruner.apply_mask(scores['w'], masks['w']), [[0.3, 0.0], [0.4, 0.0]]
  )
  drop = jaxpruner.RigL(sparsity=0.5, drop_fraction_fn=optax.constant_schedule(0.25))
  assert float(drop.drop_fraction_at(100)) == 0.25
  assert jaxpruner.NbyM is jaxpruner.NByM


def test_jaxpruner_module_names():
  # jaxpruner's programs import `api`, `algorithms.global_pruners` and reach NoPruning
  # through `base_updater`; under the import swap these are prunax's own objects.
  from prunax import api  # noqa: PLC0415
  from prunax.algorithms import global_pruners  # noqa: PLC0415

  assert jaxpruner.api is api
  assert api.create_updater_from_config is jaxpruner.create_updater_from_config
  assert api.ALGORITHM_REGISTRY is jaxpruner.ALGORITHM_REGISTRY
  assert global_pruners.GlobalMagnitudePruning is jaxpruner.GlobalMagnitudePruning
  assert global_pruners.GlobalSaliencyPruning is jaxpruner.GlobalSaliencyPruning
  assert jaxpruner.base_updater.NoPruning is jaxpruner.NoPruning
  with pytest.raises(AttributeError, match="has no attribute 'NoPrune'"):
    jaxpruner.base_updater.NoPrune  # noqa: B018
  updater = api.create_updater_from_config({'algorithm': 'global_magnitude', 'sparsity': 0.5})
  assert isinstance(updater, global_pruners.GlobalMagnitudePruning)
  # One threshold over both kernels (60 + 40 weights): round(0.5 * 100) = 50 zeros.
  sparse, _ = updater.instant_sparsify(_tree())
  zeros = sum(int(jnp.sum(sparse[k]['kernel'] == 0)) for k in ('Dense_0', 'Dense_1'))
  assert zeros == 50

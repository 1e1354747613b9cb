"""`from prunax.compat import jaxpruner`: jaxpruner's defaults and semantics on prunax.

Numbers are worked out in the comments from jaxpruner's documented rules; prunax's own
namespace keeps its defaults (checked alongside).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax.compat import jaxpruner
from tests.core import helpers


def _params():
  return {'w': jax.random.normal(jax.random.PRNGKey(1), (10, 10)), 'b': jnp.ones(10)}


def test_defaults_are_jaxpruners():
  pruner = jaxpruner.MagnitudePruning()
  assert pruner.sparsity == 0.0
  assert isinstance(pruner.scheduler, jaxpruner.NoUpdateSchedule)
  np.testing.assert_array_equal(pruner.rng_seed, jax.random.PRNGKey(8))
  state = pruner.wrap_optax(optax.sgd(0.1)).init(_params())
  # Unpacked masks: one uint8 per weight, shaped like the param (packed would be (10, 2)).
  assert state.masks['w'].shape == (10, 10) and state.masks['w'].dtype == jnp.uint8
  assert int(state.masks['w'].sum()) == 100
  # prunax's own class keeps its defaults.
  with pytest.raises(ValueError, match='needs a target sparsity'):
    prunax.MagnitudePruning()
  assert prunax.MagnitudePruning(sparsity=0.5).packed_masks is True


def test_explicit_sparsity_replaces_default_distribution():
  sparse, _ = jaxpruner.MagnitudePruning(sparsity=0.3).instant_sparsify(_params())
  assert int(jnp.sum(sparse['w'] == 0)) == 30  # round(0.3 * 100)
  assert int(jnp.sum(sparse['b'] == 0)) == 0  # 1-D leaves stay dense


def test_attribute_assignment_rebuilds_and_retraces():
  pruner = jaxpruner.RandomPruning(sparsity=0.5)
  hash_before = hash(pruner)
  pruner.rng_seed = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(pruner.rng_seed, np.array([0, 0], np.uint32))
  assert hash(pruner) != hash_before  # a jit with the updater static retraces
  masks0 = pruner.instant_sparsify(_params())[1]['w']
  pruner.rng_seed = jax.random.PRNGKey(5)
  masks5 = pruner.instant_sparsify(_params())[1]['w']
  # Both 50 zeros, at different places.
  assert int(masks0.sum()) == int(masks5.sum()) == 50
  assert not bool(jnp.all(masks0 == masks5))
  sched = jaxpruner.OneShotSchedule(0)
  pruner.scheduler = sched
  assert pruner.scheduler is sched
  # A field assignment is checked as in the constructor.
  with pytest.raises(ValueError):
    pruner.sparsity = 1.5
  # A method replaced on the instance is the one used.
  pruner.calculate_scores = lambda params, **_: jax.tree.map(lambda p: -jnp.abs(p), params)
  sparse, _ = pruner.instant_sparsify({'w': jnp.arange(1.0, 9.0).reshape(2, 4)})
  # Scores -|w|: the 4 largest magnitudes are dropped.
  np.testing.assert_array_equal(sparse['w'], [[1, 2, 3, 4], [0, 0, 0, 0]])


def test_instant_sparsify_traces_once_for_equal_updaters_and_again_when_changed():
  # jaxpruner-style updaters hash by identity (they change in place), so the copy that
  # instant_sparsify's jit keeps traced and compiled again at every call (0.8-1 s a
  # call). It is keyed by the updater's type and attribute values now: a repeated call,
  # or an equal updater, compiles nothing; a changed one traces again.
  params = _params()
  pruner = jaxpruner.RandomPruning(sparsity=0.5, rng_seed=jax.random.PRNGKey(2))
  first = pruner.instant_sparsify(params)[1]['w']
  with helpers.xla_compiles() as again:
    repeated = pruner.instant_sparsify(params)[1]['w']
    equal = jaxpruner.RandomPruning(sparsity=0.5, rng_seed=jax.random.PRNGKey(2))
    from_equal = equal.instant_sparsify(params)[1]['w']
  assert not again, len(again)
  np.testing.assert_array_equal(repeated, first)
  np.testing.assert_array_equal(from_equal, first)
  pruner.sparsity = 0.8
  assert int(pruner.instant_sparsify(params)[1]['w'].sum()) == 20
  pruner.sparsity = 0.5
  pruner.rng_seed = jax.random.PRNGKey(3)  # a new key (an array attribute): new masks
  other = pruner.instant_sparsify(params)[1]['w']
  assert int(other.sum()) == 50 and not bool(jnp.all(other == first))


def test_init_outside_jit_traces_once_for_equal_updaters():
  # The same for the wrapped optimizer's init run outside jit (its SET masks are drawn in
  # one jitted program): a run that builds its updater again (a sweep, a relaunch in the
  # same process) compiled the init again.
  params = _params()
  states = []
  for seed in (0, 0, 1):
    tx = jaxpruner.SET(sparsity=0.5, rng_seed=seed).wrap_optax(optax.adam(1e-3))
    with helpers.xla_compiles() as compiles:
      states.append(tx.init(params))
    if len(states) > 1:
      assert len(compiles) == (0 if seed == 0 else 1), (seed, len(compiles))
  same, other = (prunax.bool_masks(s, params)['w'] for s in states[1:])
  first = prunax.bool_masks(states[0], params)['w']
  np.testing.assert_array_equal(same, first)
  assert int(first.sum()) == int(other.sum()) == 50 and not bool(jnp.all(other == first))


def test_random_pruning_seed_changes_the_mask():
  params = _params()
  a = jaxpruner.RandomPruning(sparsity=0.5, rng_seed=jax.random.PRNGKey(0))
  b = dataclasses.replace(a, rng_seed=jax.random.PRNGKey(5))
  ma, mb = (u.instant_sparsify(params)[1]['w'] for u in (a, b))
  assert int(ma.sum()) == int(mb.sum()) == 50
  assert not bool(jnp.all(ma == mb))


def test_scores_are_arrays():
  scores = jaxpruner.MagnitudePruning(sparsity=0.5).calculate_scores({'w': jnp.array([-2.0, 1.0])})
  assert isinstance(scores['w'], jax.Array)
  np.testing.assert_array_equal(scores['w'] - 1.0, [1.0, 0.0])


def test_polynomial_schedule_steps_and_values():
  sched = jaxpruner.PolynomialSchedule(update_freq=5, update_start_step=0, update_end_step=20)
  # p = (9 + 1 - 0) / 20 = 0.5: 0.5 * (1 - 0.5 ** 3) = 0.4375.
  out = sched.get_sparsity_at_step({'a': 0.5, 'b': None}, 9)
  assert out['b'] is None and float(out['a']) == pytest.approx(0.4375)
  assert float(jax.jit(sched.get_sparsity_at_step)({'a': 0.5}, 9)['a']) == pytest.approx(0.4375)
  assert float(sched.get_sparsity_at_step({'a': 0.5}, 19)['a']) == pytest.approx(0.5)
  # The end step is an update step (prunax's PeriodicSchedule window is [start, end)).
  assert bool(sched.is_mask_update_iter(20)) and not bool(sched.is_mask_update_iter(21))
  # The optimizer uses the value at the last update step: at step 12 that is step 10,
  # p = 11 / 20: 0.5 * (1 - 0.45 ** 3) = 0.4544375.
  assert float(sched.sparsity(12, 0.5)) == pytest.approx(0.4544375)


def test_periodic_schedule_counts_from_zero():
  sched = jaxpruner.PeriodicSchedule(update_freq=5, update_start_step=3, update_end_step=20)
  steps = [s for s in range(25) if bool(sched.is_mask_update_iter(s))]
  assert steps == [5, 10, 15, 20]
  ours = prunax.sparsity_schedules.PeriodicSchedule(5, 3, 20)
  assert [s for s in range(25) if bool(ours.is_update_step(s))] == [3, 8, 13, 18]


def test_one_shot_sparsity_is_the_target_at_every_step():
  sched = jaxpruner.OneShotSchedule(target_step=20)
  assert sched.get_sparsity_at_step({'a': 0.5}, 10) == {'a': 0.5}
  assert bool(sched.is_mask_update_iter(20)) and not bool(sched.is_mask_update_iter(19))


def test_gradual_pruning_through_wrap_optax():
  sched = jaxpruner.PolynomialSchedule(update_freq=2, update_start_step=0, update_end_step=4)
  pruner = jaxpruner.MagnitudePruning(sparsity=0.5, scheduler=sched)
  params = {'w': jnp.arange(1.0, 101.0).reshape(10, 10)}
  tx = pruner.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  zeros = []
  for _ in range(6):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
    zeros.append(int(jnp.sum(params['w'] == 0)))
  # Steps 0, 2, 4 update: p = 1/4, 3/4, 1 -> 0.5 * (1 - (1 - p) ** 3) = 0.2890625,
  # 0.4921875, 0.5 of 100 weights -> 29, 49, 50 zeros.
  assert zeros == [29, 29, 49, 49, 50, 50]


def test_erk_needs_a_tree():
  with pytest.raises(ValueError, match='single array of shape \\(2, 2\\)'):
    jaxpruner.sparsity_distributions.erk(jnp.ones((2, 2)), 0.5)
  dist = functools.partial(jaxpruner.sparsity_distributions.erk, sparsity=0.8)
  pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist)
  assert pruner.sparsity == 0.8
  assert pruner.sparsity_distribution_fn is prunax.sparsity_distributions.erk


def test_n_by_m_last_axis_and_errors_at_mask_time():
  nm = jaxpruner.sparsity_types.NByM(n=2, m=4)
  assert nm.axis == -1
  mask = jaxpruner.get_topk_fn(nm)(jnp.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]), 0.5)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [0, 0, 1, 1]])
  # jaxpruner's activation-sparsity project passes sparsity=None: N:M's own.
  np.testing.assert_array_equal(jaxpruner.get_topk_fn(nm)(jnp.arange(4.0), None), [0, 0, 1, 1])
  too_many = jaxpruner.sparsity_types.NByM(n=4, m=2)  # constructs, as in jaxpruner
  with pytest.raises(ValueError, match='n=4, m=2'):
    jaxpruner.get_topk_fn(too_many)(jnp.ones((2, 4)), 0.5)
  with pytest.raises(ValueError, match='has 5 weights, not a multiple of m=4'):
    jaxpruner.get_topk_fn(jaxpruner.sparsity_types.NByM(2, 4, axis=1))(jnp.ones((2, 5, 3)), 0.5)
  with pytest.raises(ValueError):
    prunax.NByM(n=4, m=2)


def test_get_topk_fn_takes_a_class():
  mask = jaxpruner.get_topk_fn(jaxpruner.sparsity_types.Unstructured)(jnp.arange(4.0), 0.5)
  np.testing.assert_array_equal(mask, [0, 0, 1, 1])


def test_global_pruners_normalise_each_leaf():
  scores = {'w': jnp.array([10.0, 9.0, 8.0, 7.0]), 'w2': jnp.array([1.0, 0.9])}
  pruner = jaxpruner.GlobalMagnitudePruning(filter_fn=lambda *_: True, sparsity=0.5)
  assert pruner.use_normalization
  # Divided by their norms (17.15, 1.345): w2's 0.743, 0.669 beat w's largest 0.583.
  masks = pruner.create_masks(scores, target_sparsity=0.5)
  np.testing.assert_array_equal(masks['w'], [1, 0, 0, 0])
  np.testing.assert_array_equal(masks['w2'], [1, 1])
  raw = dataclasses.replace(pruner, use_normalization=False)
  masks = raw.create_masks(scores, target_sparsity=0.5)
  np.testing.assert_array_equal(masks['w'], [1, 1, 1, 0])
  np.testing.assert_array_equal(masks['w2'], [0, 0])
  assert jaxpruner.GlobalMagnitudePruning().sparsity == 0.0


def test_sparse_trainer_defaults():
  rigl = jaxpruner.RigL(sparsity=0.5)
  assert rigl.skip_gradients and not rigl.is_debug and rigl.eps == 1e-5
  assert jaxpruner.SET(sparsity=0.5, is_debug=True).is_debug
  assert not prunax.RigL(sparsity=0.5, drop_fraction_fn='constant').skip_gradients


def test_config_schedules_and_classes():
  cfg = {'algorithm': 'magnitude', 'sparsity': 0.9, 'dist_type': 'uniform'}
  updater = jaxpruner.create_updater_from_config(cfg)
  assert isinstance(updater, jaxpruner.MagnitudePruning)
  assert isinstance(updater.scheduler, jaxpruner.NoUpdateSchedule)
  assert isinstance(
    prunax.create_updater_from_config(cfg).scheduler, prunax.sparsity_schedules.OneShotSchedule
  )
  cfg.update(update_freq=10, update_start_step=200, update_end_step=1000)
  sched = jaxpruner.create_updater_from_config(cfg).scheduler
  assert isinstance(sched, jaxpruner.PolynomialSchedule)
  assert (sched.update_freq, sched.update_start_step, sched.update_end_step) == (10, 200, 1000)
  cfg.update(update_end_step=200)
  assert isinstance(jaxpruner.create_updater_from_config(cfg).scheduler, jaxpruner.OneShotSchedule)
  assert isinstance(
    jaxpruner.create_updater_from_config({'algorithm': 'no_prune'}), jaxpruner.NoPruning
  )
  with pytest.raises(ValueError, match=r'jaxpruner.all_algorithm_names\(\)'):
    jaxpruner.create_updater_from_config({'algorithm': 'nope'})
  with pytest.raises(ValueError, match="Sparsity type 'wrong' is not supported"):
    jaxpruner.create_updater_from_config({'algorithm': 'magnitude', 'sparsity_type': 'wrong'})
  with pytest.raises(ValueError, match='dist_type'):
    jaxpruner.create_updater_from_config({'algorithm': 'magnitude', 'dist_type': 'x'})


@pytest.mark.parametrize('adam', [True, False])
def test_update_state_restarts_moments_of_grown_weights(adam):
  dist = functools.partial(
    jaxpruner.sparsity_distributions.uniform, filter_fn=lambda *_: True, sparsity=0.5
  )
  rigl = jaxpruner.RigL(sparsity_distribution_fn=dist)
  params = {'w': jax.random.normal(jax.random.PRNGKey(0), (5, 4))}
  tx = rigl.wrap_optax(optax.adam(1e-3) if adam else optax.sgd(1e-3, momentum=0.9))
  names = ['mu', 'nu'] if adam else ['trace']
  state = tx.init(params)
  acc = state.inner_state[0]
  acc = acc._replace(**{k: jax.tree.map(jnp.ones_like, getattr(acc, k)) for k in names})
  state = state._replace(inner_state=(acc, *state.inner_state[1:]))
  old = np.asarray(state.masks['w']).astype(bool)
  grads = {'w': jax.random.normal(jax.random.PRNGKey(8), (5, 4))}
  state = rigl.update_state(state, params, grads)
  # RigL by hand: 10 active weights, drop fraction 0.3: the 3 active weights of least
  # magnitude are dropped, then the 3 of largest gradient among the others not kept
  # (a dropped weight may come back) are grown.
  w, g = np.abs(np.asarray(params['w'])).ravel(), np.abs(np.asarray(grads['w'])).ravel()
  active = np.flatnonzero(old.ravel())
  assert active.size == 10
  kept = np.zeros(20, bool)
  kept[active[np.argsort(w[active], kind='stable')[3:]]] = True
  candidates = np.flatnonzero(~kept)
  new = kept.copy()
  new[candidates[np.argsort(-g[candidates], kind='stable')[:3]]] = True
  np.testing.assert_array_equal(np.asarray(state.masks['w']).astype(bool).ravel(), new)
  grown = ~old & new.reshape(5, 4)
  assert int(grown.sum()) >= 1
  for k in names:
    moment = np.asarray(getattr(state.inner_state[0], k)['w'])
    assert float(moment[grown].sum()) == 0.0
    # The other entries keep their 1s.
    assert float(moment[~grown].sum()) == 20 - int(grown.sum())


def test_block_on_a_3d_leaf_blocks_the_leading_dims():
  # Channel 0 of the top-left 2x2 tile is bright (1.0), channel 1 of the bottom-right 0.9.
  scores = jnp.zeros((4, 4, 2)).at[:2, :2, 0].set(1.0).at[2:, 2:, 1].set(0.9)
  block = jaxpruner.sparsity_types.Block(block_shape=(2, 2), use_avg_pooling=False)
  mask = jaxpruner.get_topk_fn(block)(scores, 0.75)
  # 2x2 blocks over dims 0 and 1 spanning both channels: 4 blocks of 8 weights; 75%
  # sparsity keeps 1 block, the top-left (max 1.0), both channels. (Blocks of one
  # channel would keep the two bright 4-weight tiles instead.)
  assert int(mask.sum()) == 8
  np.testing.assert_array_equal(mask[:2, :2, :], 1)
  ours = prunax.sparsity_types.Block((2, 2, 2), use_avg_pooling=False).mask(scores, 0.75)
  np.testing.assert_array_equal(mask, ours)


def test_n_by_m_ignores_the_target_and_block_fits_conv_kernels():
  params = {'k': jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 8))}
  cfg = {'algorithm': 'magnitude', 'sparsity': 0.9, 'sparsity_type': 'nm_1,4'}
  with pytest.raises(ValueError, match='0.75'):
    prunax.create_updater_from_config(cfg)
  pruner = jaxpruner.create_updater_from_config(cfg)
  assert pruner.sparsity == 0.75
  dist = functools.partial(jaxpruner.sparsity_distributions.uniform, sparsity=0.9)
  pruner = jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist, sparsity_type='nm_1,4')
  sparse, _ = pruner.instant_sparsify(params)
  assert int(jnp.sum(sparse['k'] == 0)) == 216  # 3/4 of 288
  # A (2, 2) block on a (3, 3, 4, 8) conv kernel tiles the 3x3 window (partial blocks at
  # the edges count as blocks): 4 tiles spanning 32 channels.
  block = jaxpruner.sparsity_types.Block(block_shape=(2, 2))
  pruner = jaxpruner.MagnitudePruning(sparsity=0.5, sparsity_type=block)
  mask = pruner.instant_sparsify(params)[1]['k']
  tiles = {(i, j): bool(mask[2 * i, 2 * j].all()) for i in range(2) for j in range(2)}
  assert sum(tiles.values()) == 2 and bool(jnp.all(mask == mask[:, :, :1, :1]))


def test_ste_drops_skip_gradients_with_a_warning():
  with pytest.warns(UserWarning, match='skip_gradients=True is ignored'):
    ste = jaxpruner.SteMagnitudePruning(sparsity=0.5, skip_gradients=True)
  assert ste.skip_gradients is False


def test_colab_configs_nm_erk_block_conv_and_ste_skip():
  params = {
    'Conv_0': {'kernel': jnp.ones((3, 3, 1, 32))},
    'Dense_0': {'kernel': jnp.ones((64, 16))},
  }
  base = {'algorithm': 'magnitude', 'sparsity': 0.9, 'dist_type': 'erk'}
  nm = jaxpruner.create_updater_from_config({**base, 'sparsity_type': 'nm_1,4'})
  assert nm.sparsity == 0.75 and nm.sparsity_type.axis == -1
  sparse, _ = nm.instant_sparsify(params)
  assert int(jnp.sum(sparse['Dense_0']['kernel'] == 0)) == 768  # 3/4 of 1024
  block = jaxpruner.create_updater_from_config({**base, 'sparsity_type': 'block_2,2'})
  assert isinstance(block.sparsity_type, jaxpruner.sparsity_types.Block)
  block.instant_sparsify(params)  # a (2, 2) block fits the 3x3 conv window
  with pytest.warns(UserWarning, match='skip_gradients=True is ignored'):
    ste = jaxpruner.create_updater_from_config(
      {'algorithm': 'magnitude_ste', 'sparsity': 0.5, 'skip_gradients': True}
    )
  assert ste.skip_gradients is False


def _nm_erk_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(5))
  return {'small': jax.random.normal(k1, (2, 4)), 'big': jax.random.normal(k2, (32, 64))}


def _check_nm_erk(updater):
  # ERK at 0.9 over 8 + 2048 weights: raw densities eps * 6/8 and eps * 96/2048; keeping
  # 205.6 weights gives eps = 205.6 / 102 = 2.02, so 'small' would exceed density 1 and is
  # dense; 'big' takes the rest (sparsity 0.90). jaxpruner computes N:M masks only where
  # the target is non-zero: 'small' stays dense (8 kept), 'big' keeps 2 of every 4 (1024).
  sparse, masks = updater.instant_sparsify(_nm_erk_params())
  assert int(jnp.sum(sparse['small'] != 0)) == 8
  assert int(jnp.sum(sparse['big'] != 0)) == 1024
  assert (np.asarray(masks['big']).reshape(32, 16, 4).sum(-1) == 2).all()


def test_nm_under_erk_keeps_erk_dense_leaves_dense_config():
  cfg = {'algorithm': 'magnitude', 'sparsity': 0.9, 'dist_type': 'erk', 'sparsity_type': 'nm_2,4'}
  updater = jaxpruner.create_updater_from_config(cfg)
  assert updater.sparsity == 0.5
  _check_nm_erk(updater)


def test_nm_under_erk_keeps_erk_dense_leaves_dense_class():
  dist = functools.partial(jaxpruner.sparsity_distributions.erk, sparsity=0.9)
  nm = jaxpruner.sparsity_types.NByM(2, 4)
  _check_nm_erk(jaxpruner.MagnitudePruning(sparsity_distribution_fn=dist, sparsity_type=nm))
  _check_nm_erk(
    jaxpruner.MagnitudePruning(sparsity_distribution_fn='erk', sparsity=0.9, sparsity_type=nm)
  )
  # A zero target keeps every leaf dense, as in jaxpruner.
  zero_dist = functools.partial(jaxpruner.sparsity_distributions.erk, sparsity=0.0)
  zero = jaxpruner.MagnitudePruning(sparsity_distribution_fn=zero_dist, sparsity_type=nm)
  sparse, _ = zero.instant_sparsify(_nm_erk_params())
  assert int(jnp.sum(sparse['big'] == 0)) == 0


@pytest.mark.parametrize(
  'bind',
  [
    lambda fn, **kw: prunax.sparsity_distributions.Partial(fn, **kw),
    functools.partial,
  ],
  ids=['prunax_partial', 'functools_partial'],
)
def test_updater_filter_and_map_join_a_bound_distribution(bind):
  # The updater's filter_fn / custom_sparsity_map fields join a distribution's own bound
  # keywords; bound by functools.partial it was refused as not uniform or ERK.
  params = {'a': jnp.ones((8, 8)), 'b': jnp.ones((8, 4)), 'c': jnp.ones((4, 4))}
  dist = bind(prunax.sparsity_distributions.uniform, filter_fn=lambda name, leaf: name != 'b')
  updater = prunax.MagnitudePruning(
    sparsity=0.5, sparsity_distribution_fn=dist, custom_sparsity_map={'a': 0.25}
  )
  assert updater.target_sparsities(params) == {'a': 0.25, 'b': None, 'c': 0.5}
  # A keyword bound in the distribution and given to the updater too: named, not a
  # TypeError of Python's ("multiple values for keyword argument").
  if bind is not functools.partial:  # prunax's Partial of one's own distribution, as before

    def own(params, sparsity, filter_fn=None, custom_sparsity_map=None, scale=1.0):
      dist = prunax.sparsity_distributions.uniform
      return dist(params, sparsity * scale, filter_fn, custom_sparsity_map)

    updater = prunax.MagnitudePruning(
      sparsity=0.5, sparsity_distribution_fn=bind(own, scale=0.5), filter_fn=lambda n, _: n != 'b'
    )
    assert updater.target_sparsities(params) == {'a': 0.25, 'b': None, 'c': 0.25}
  mapped = bind(prunax.sparsity_distributions.uniform, custom_sparsity_map={'c': 0.75})
  with pytest.raises(ValueError, match=r"\['custom_sparsity_map'\] given to the updater and bound"):
    prunax.MagnitudePruning(
      sparsity=0.5, sparsity_distribution_fn=mapped, custom_sparsity_map={'a': 0.25}
    )


def test_create_masks_and_update_state_outside_jit_compile_once():
  # jaxpruner's methods called outside jit ran their selection loops eagerly, which
  # compiled again at every call (bound outside a trace, the loops' bodies are new
  # closures); they now run one jitted function each, keyed by the updater's values.
  # Leaves above 1024 weights: smaller ones are selected by a sort, with no loop.
  k = jax.random.split(jax.random.PRNGKey(4))
  params = {'w': jax.random.normal(k[0], (64, 128)), 'b': jax.random.normal(k[1], (128,))}
  pruner = jaxpruner.RigL(sparsity=0.75, drop_fraction_fn='constant')
  state = pruner.wrap_optax(optax.sgd(0.1)).init(params)
  scores = jax.tree.map(jnp.abs, params)
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  masks = pruner.create_masks(scores, 0.75)
  updated = pruner.update_state(state, params, grads)
  with helpers.xla_compiles() as later:
    again = pruner.create_masks(scores, 0.75)
    updated_again = pruner.update_state(state, params, grads)
  assert not later, len(later)
  # The same as inside a caller's jit, where the methods run as they are.
  traced_masks, traced_state = jax.jit(
    lambda s, p, g, sc: (pruner.create_masks(sc, 0.75), pruner.update_state(s, p, g))
  )(state, params, grads, scores)
  assert masks['w'].dtype == jnp.uint8 and int(masks['w'].sum()) == 2048
  kept = np.asarray(scores['w'])[np.asarray(masks['w']) == 1]
  dropped = np.asarray(scores['w'])[np.asarray(masks['w']) == 0]
  assert kept.min() >= dropped.max()
  for a, b in ((again, masks), (traced_masks, masks)):
    np.testing.assert_array_equal(a['w'], b['w'])
  for a, b in ((updated_again, updated), (traced_state, updated)):
    np.testing.assert_array_equal(a.masks['w'], b.masks['w'])
  assert int(np.asarray(updated.masks['w']).sum()) == 2048


def test_apply_masks_reads_the_state_masks_of_unpruned_leaves():
  # jaxpruner's apply_masks(params, opt_state.masks): the state holds MaskedNode where a
  # leaf is not pruned (here the 1-D bias), which stays as it is.
  pruner = jaxpruner.MagnitudePruning(sparsity=0.5, scheduler=jaxpruner.OneShotSchedule(0))
  tx = pruner.wrap_optax(optax.sgd(0.1))
  params = _params()
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  masked = pruner.apply_masks(params, state.masks)
  assert int(jnp.sum(masked['w'] == 0)) == 50
  np.testing.assert_array_equal(masked['b'], params['b'])
  np.testing.assert_array_equal(pruner.apply_masks(params, state.masks, None)['w'], masked['w'])

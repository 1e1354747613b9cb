"""Bad values are rejected where they are given; edge cases get clear errors or just work.

Each test here failed before the validation it checks: the values were accepted (and
pruned everything, nothing, or the wrong amount), x64 mode broke every top-k, empty and
scalar leaves crashed, and a param that changed shape after ``init`` reused a stale mask.
"""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import sparsity_distributions as dists
from prunax import sparsity_schedules as sched
from prunax import sparsity_types

NAN, INF = float('nan'), float('inf')

# (constructor call, regex its error must match: the bad value and what is valid).
BAD_VALUES = {
  'sparsity str': (
    lambda: prunax.MagnitudePruning(sparsity='0.8'),
    r"finite number in \[0, 1\), got '0.8'",
  ),
  'sparsity bool': (lambda: prunax.MagnitudePruning(sparsity=True), r'got True'),
  'nm n=0': (lambda: prunax.NByM(0, 4), r'n must be an integer in \[1, 4\], got 0'),
  'nm_0,4': (lambda: sparsity_types.from_string('nm_0,4'), r'in \[1, 4\], got 0'),
  'nm bool': (lambda: prunax.NByM(True, 4), r'got True'),
  'nm axis float': (lambda: prunax.NByM(2, 4, axis=1.5), r'axis must be an integer, got 1.5'),
  'channel axis str': (lambda: prunax.Channel(axis='x'), r"axis must be an integer, got 'x'"),
  'block pooling': (
    lambda: prunax.Block((2, 2), use_avg_pooling='no'),
    r"use_avg_pooling must be True or False, got 'no'",
  ),
  'power -1': (lambda: sched.PolynomialSchedule(power=-1), r'power must be > 0, got -1'),
  'power nan': (lambda: sched.PolynomialSchedule(power=NAN), r'power must be a finite'),
  'power str': (lambda: sched.PolynomialSchedule(power='3'), r"power .*got '3'"),
  'initial_sparsity str': (
    lambda: sched.PolynomialSchedule(initial_sparsity='0'),
    r"initial_sparsity .*got '0'",
  ),
  'end == start': (lambda: sched.PolynomialSchedule(10, 100, 100), r'end must be after'),
  'packed_masks str': (
    lambda: prunax.MagnitudePruning(sparsity=0.5, packed_masks='no'),
    r"packed_masks must be True or False, got 'no'",
  ),
  'seed str': (
    lambda: prunax.MagnitudePruning(sparsity=0.5, seed='abc'),
    r"seed must be an integer .*got 'abc'",
  ),
  'seed float': (lambda: prunax.RandomPruning(sparsity=0.5, seed=1.5), r'seed .*got 1.5'),
  'threshold_lr nan': (
    lambda: prunax.AutoSparse(threshold_lr=NAN),
    r'threshold_lr \(None or a learning rate\) must be a finite number >= 0, got nan',
  ),
  'training_steps 0': (
    lambda: prunax.AutoSparse(training_steps=0),
    r'training_steps \(None or a number of steps\) must be an integer >= 1, got 0',
  ),
  'str alpha None': (lambda: prunax.STR(alpha=None), r'STR is AutoSparse with alpha = 0'),
  'threshold_weight_decay str': (
    lambda: prunax.AutoSparse(threshold_weight_decay='0'),
    r"threshold_weight_decay .*got '0'",
  ),
  's_init inf': (lambda: prunax.AutoSparse(s_init=-INF), r's_init must be a finite number'),
  'sr_ste decay nan': (lambda: prunax.SRSTE(decay=NAN), r'decay must be a finite'),
  'topkast penalty inf': (
    lambda: prunax.TopKAST(sparsity=0.5, penalty=INF),
    r'penalty must be a finite',
  ),
  'drop_fraction str': (
    lambda: prunax.SET(sparsity=0.5, drop_fraction='0.3'),
    r"drop_fraction .*got '0.3'",
  ),
  'annealing beta nan': (lambda: prunax.GradientAnnealing(beta=NAN), r'beta must be a finite'),
  'annealing alpha0 str': (lambda: prunax.GradientAnnealing(alpha0='1'), r"alpha0 .*got '1'"),
  'annealing steps bool': (
    lambda: prunax.GradientAnnealing(steps_per_period=True),
    r'steps_per_period must be an integer >= 1, got True',
  ),
  'annealing decay_steps float': (
    lambda: prunax.GradientAnnealing('cosine', decay_steps=10.5),
    r'decay_steps .*got 10.5',
  ),
  'erk_power_scale nan': (
    lambda: dists.Partial('erk', erk_power_scale=NAN),
    r'erk_power_scale must be a finite',
  ),
  'partial unknown kwarg': (lambda: dists.Partial('uniform', filter=None), r"'filter'"),
  'custom map key': (lambda: dists.CustomMap({1: 0.5}), r'keys must be .* got 1'),
  'custom map value': (
    lambda: prunax.MagnitudePruning(sparsity_distribution_fn={'w': '0.5'}),
    r"sparsity for 'w' .*got '0.5'",
  ),
  'synflow input_shape': (
    lambda: prunax.pruning_at_init.SynFlow(sparsity=0.5, apply_fn=abs, input_shape=(1, 0)),
    r'input_shape must be a tuple of positive integers',
  ),
  'synflow iterations float': (
    lambda: prunax.pruning_at_init.SynFlow(
      sparsity=0.5, apply_fn=abs, input_shape=(1, 4), iterations=2.0
    ),
    r'iterations .*got 2.0',
  ),
  'lottery prune_fraction str': (
    lambda: prunax.lottery.iterative_magnitude_pruning(None, {}, 2, prune_fraction='0.2'),
    r"prune_fraction must be a finite number in \(0, 1\), got '0.2'",
  ),
  'config extra overrides a key': (
    lambda: prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'extra': {'sparsity': 0.9}}
    ),
    r"\"extra\" sets 'sparsity'",
  ),
  'config extra unknown': (
    lambda: prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'extra': {'bogus': 1}}
    ),
    r"'bogus', which is not an argument of MagnitudePruning",
  ),
  'config power nan': (
    lambda: prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'update_end_step': 10, 'power': NAN}
    ),
    r'power must be a finite',
  ),
  'config seed str': (
    lambda: prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'seed': '0'}
    ),
    r"seed .*got '0'",
  ),
  'config packed_masks str': (
    lambda: prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.5, 'packed_masks': 'false'}
    ),
    r"packed_masks must be True or False, got 'false'",
  ),
}


@pytest.mark.parametrize('name', list(BAD_VALUES))
def test_bad_values_are_rejected_at_construction(name):
  make, match = BAD_VALUES[name]
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_valid_numpy_scalars_are_accepted_as_plain_python_values():
  updater = prunax.MagnitudePruning(sparsity=np.float32(0.5), seed=np.int64(3))
  assert type(updater.sparsity) is float and type(updater.seed) is int
  assert prunax.NByM(np.int64(2), 4) == prunax.NByM(2, 4)
  assert hash(updater) == hash(prunax.MagnitudePruning(sparsity=0.5, seed=3))


def _nm_groups_kept(mask, m):
  mask = np.asarray(mask)
  if mask.ndim >= 2:  # groups run along the input axis (-2) by default
    mask = np.moveaxis(mask, -2, -1)
  return mask.reshape(-1, m).sum(1)


def test_n_by_m_sparsity_is_one_minus_n_over_m():
  # Another target is an error naming both values (it used to be silently 1 - n/m).
  with pytest.raises(ValueError, match=r'1 - n/m = 0.5 .* target sparsity 0.9'):
    prunax.MagnitudePruning(sparsity=0.9, sparsity_type='nm_2,4')
  with pytest.raises(ValueError, match=r'1 - n/m = 0.5 .* target sparsity 0.9'):
    prunax.create_updater_from_config(
      {'algorithm': 'magnitude', 'sparsity': 0.9, 'sparsity_type': 'nm_2,4'}
    )
  with pytest.raises(ValueError, match=r'ERK'):
    prunax.MagnitudePruning(sparsity_type='nm_2,4', sparsity_distribution_fn='erk')
  params = {
    'a': jax.random.normal(jax.random.PRNGKey(0), (4, 8)),
    'b': jax.random.normal(jax.random.PRNGKey(1), (8, 8)),
  }
  # Per-leaf targets from a custom map are checked too; 0.0 keeps a leaf dense.
  with pytest.raises(ValueError, match=r"parameter 'b' has target sparsity 0.3"):
    prunax.MagnitudePruning(
      sparsity_type='nm_2,4', sparsity_distribution_fn={'a': 0.5, 'b': 0.3}
    ).instant_sparsify(params)
  _, masks = prunax.MagnitudePruning(
    sparsity_type='nm_1,4', sparsity_distribution_fn={'a': 0.75, 'b': 0.0}
  ).instant_sparsify(params)
  assert (_nm_groups_kept(masks['a'], 4) == 1).all() and np.asarray(masks['b']).all()
  # Without a sparsity, N:M sets it (updater and config alike; SR-STE follows its pattern).
  assert prunax.MagnitudePruning(sparsity_type='nm_2,4').sparsity == 0.5
  assert prunax.SRSTE(sparsity_type='nm_1,4').sparsity == 0.75
  # Gradual N:M from a config: updates at steps 1, 3, 5; the scheduled sparsity is 0 at
  # step 1 (the schedule's start) and 0.4375 at step 3, which switches 2:4 on.
  updater = prunax.create_updater_from_config(
    {
      'algorithm': 'magnitude',
      'sparsity_type': 'nm_2,4',
      'update_freq': 2,
      'update_start_step': 1,
      'update_end_step': 5,
    }
  )
  assert isinstance(updater.scheduler, sched.PolynomialSchedule) and updater.sparsity == 0.5
  tx = updater.wrap_optax(optax.sgd(0.01))
  step = jax.jit(tx.update)
  state, p = tx.init(params), params
  kept = []
  for _ in range(4):
    updates, state = step(params, state, p)
    p = optax.apply_updates(p, updates)
    kept.append(_nm_groups_kept(prunax.bool_masks(state, p)['b'], 4))
  assert [sorted(set(k.tolist())) for k in kept] == [[4], [4], [4], [2]]


def test_x64_mode_works():
  # An int32 count summed without a dtype became int64 under x64, and the top-k loop's
  # carry types no longer matched: every top-k raised a TypeError.
  p = {'w': jax.random.normal(jax.random.PRNGKey(0), (40, 48))}
  updaters = [
    prunax.MagnitudePruning(sparsity=0.7),
    prunax.RigL(sparsity=0.7, scheduler=sched.PeriodicSchedule(1)),
    prunax.SET(sparsity=0.7, scheduler=sched.PeriodicSchedule(1)),
    prunax.GlobalMagnitudePruning(sparsity=0.7),
    prunax.SteMagnitudePruning(sparsity=0.7),
  ]
  txs = [u.wrap_optax(optax.sgd(0.1)) for u in updaters]
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), p)

    @jax.jit
    def steps(params):
      out = []
      for tx in txs:
        state = tx.init(params)
        updates, state = tx.update(params, state, params)
        out.append((optax.apply_updates(params, updates), prunax.bool_masks(state, params)))
      return out

    results = steps(params)
  expected = round(0.7 * 40 * 48)
  for (new, masks), updater in zip(results, updaters):
    assert new['w'].dtype == jnp.float64
    assert int((~masks['w']).sum()) == expected, type(updater).__name__
    assert not np.asarray(new['w'])[~np.asarray(masks['w'])].any()


def test_empty_and_scalar_leaves():
  params = {
    'empty': jnp.zeros((0, 5)),
    'scalar': jnp.float32(2.0),
    'w': jax.random.normal(jax.random.PRNGKey(0), (4, 8)),
  }
  # The default filter skips them (an empty leaf divided by zero before).
  tx = prunax.GlobalMagnitudePruning(sparsity=0.5).wrap_optax(optax.sgd(0.1))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  masks = prunax.bool_masks(state, params)
  assert masks['empty'] is None and masks['scalar'] is None
  assert int((~masks['w']).sum()) == 16
  # Forced by a custom map or a filter, they are rejected by name (IndexError before).
  every = dists.Partial('uniform', filter_fn=lambda name, leaf: True)
  for dist, name in [({'scalar': 0.5}, 'scalar'), ({'empty': 0.5}, 'empty'), (every, 'empty')]:
    updater = prunax.MagnitudePruning(sparsity=0.5, sparsity_distribution_fn=dist)
    with pytest.raises(ValueError, match=rf"Parameter '{name}' has shape .* cannot be pruned"):
      updater.wrap_optax(optax.sgd(0.1)).init(params)


@pytest.mark.parametrize('algorithm', ['magnitude', 'magnitude_ste'])
@pytest.mark.parametrize('packed', [True, False])
@pytest.mark.parametrize('new_shape', [(6, 7), (8, 8), (6, 8, 1)])
def test_param_shape_change_between_init_and_update_names_the_leaf(algorithm, packed, new_shape):
  updater = prunax.create_updater_from_config(
    {'algorithm': algorithm, 'sparsity': 0.5, 'packed_masks': packed}
  )
  tx = updater.wrap_optax(optax.sgd(0.1))
  state = tx.init({'layer': {'w': jnp.ones((6, 8))}})
  new = {'layer': {'w': jnp.ones(new_shape)}}
  with pytest.raises(ValueError, match=r"'layer/w'.*\(6, ?8\)|'layer/w'.*\[6, 8\]"):
    jax.eval_shape(tx.update, new, state, new)  # checked while tracing: nothing compiles


def test_param_dtype_change_of_dense_weights_names_the_leaf():
  tx = prunax.SteMagnitudePruning(sparsity=0.5).wrap_optax(optax.sgd(0.1))
  state = tx.init({'w': jnp.ones((6, 8))})
  new = {'w': jnp.ones((6, 8), jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"'w' is bfloat16\[6, 8\] .* float32\[6, 8\]"):
    jax.eval_shape(tx.update, new, state, new)


# ------------------------------------------------------------------ property tests

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Each example compiles one step (the updater is a static argument): few examples, small.
SETTINGS = hypothesis.settings(
  max_examples=12,
  deadline=None,
  derandomize=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


def _one_step(updater, params):
  """Masks and params after one jitted wrapped step (mask update at step 0)."""
  tx = updater.wrap_optax(optax.adam(1e-3))
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  return prunax.bool_masks(state, new), new


@SETTINGS
@hypothesis.given(
  shapes=st.lists(st.lists(st.integers(1, 9), min_size=2, max_size=3), min_size=1, max_size=2),
  dtype=st.sampled_from(DTYPES),
  sparsity=st.floats(0.0, 0.99),
  seed=st.integers(0, 2**16),
)
def test_unstructured_counts_are_exact(shapes, dtype, sparsity, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  params = {
    f'w{i}': jax.random.normal(k, s).astype(dtype) for i, (k, s) in enumerate(zip(keys, shapes))
  }
  masks, new = _one_step(prunax.MagnitudePruning(sparsity=sparsity), params)
  for name, shape in zip(params, shapes):
    n = math.prod(shape)
    # The documented count: round(s * n), keeping at least one weight.
    expected = min(int(np.round(np.float32(sparsity) * np.float32(n))), n - 1)
    mask = np.asarray(masks[name])
    assert int((~mask).sum()) == expected, (name, shape)
    assert new[name].dtype == dtype
    assert not np.asarray(new[name], np.float32)[~mask].any()


@SETTINGS
@hypothesis.given(
  n_m=st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (5, 8)]),
  groups=st.integers(1, 3),
  other=st.integers(1, 5),
  axis=st.sampled_from([0, 1]),
  dtype=st.sampled_from(DTYPES),
  seed=st.integers(0, 2**16),
)
def test_n_by_m_groups_are_exact(n_m, groups, other, axis, dtype, seed):
  n, m = n_m
  shape = (groups * m, other) if axis == 0 else (other, groups * m)
  # Few distinct values, so groups hold ties.
  w = jnp.round(jax.random.normal(jax.random.PRNGKey(seed), shape) * 2).astype(dtype) + 0.5
  masks, new = _one_step(prunax.MagnitudePruning(sparsity_type=prunax.NByM(n, m, axis)), {'w': w})
  mask = np.moveaxis(np.asarray(masks['w']), axis, -1)
  assert (mask.reshape(-1, m).sum(1) == n).all()
  assert not np.asarray(new['w'], np.float32)[~np.asarray(masks['w'])].any()


@pytest.mark.parametrize(
  ('returned', 'message'),
  [
    (lambda s: {'a': s}, r"it has none for \['b'\]"),
    (lambda s: {'a': s, 'b': s, 'c': s}, r"entries \['c'\] that are no parameter"),
    (lambda s: [s, s], r"none for \['a', 'b'\]; it has entries \['0', '1'\]"),
  ],
)
def test_a_distribution_that_misses_a_leaf_names_it(returned, message):
  params = {'a': jnp.ones((4, 4)), 'b': jnp.ones((4, 4))}
  pruner = prunax.MagnitudePruning(sparsity=0.5, sparsity_distribution_fn=lambda p, s: returned(s))
  with pytest.raises(ValueError, match=message):
    pruner.instant_sparsify(params)
  with pytest.raises(ValueError, match=message):
    pruner.wrap_optax(optax.sgd(0.1)).init(params)

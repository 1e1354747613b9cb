"""Sparsity distributions (uniform, ERK, custom) and schedules against their formulas."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import sparsity_distributions as dists
from prunax import sparsity_schedules as sched


def _shapes_tree():
  return {
    'conv': {'kernel': jnp.zeros((3, 3, 4, 8)), 'bias': jnp.zeros(8)},
    'dense1': {'kernel': jnp.zeros((128, 64))},
    'dense2': {'kernel': jnp.zeros((64, 10))},
    'embed': jnp.zeros((1000, 16)),
  }


def test_path_names_for_dicts_lists_and_attributes():
  tree = {'a': [jnp.zeros(1), (jnp.zeros(2),)], 'b': flax.core.FrozenDict({'c': jnp.zeros(3)})}
  assert [n for n, _ in dists.named_leaves(tree)] == ['a/0', 'a/1/0', 'b/c']


def test_uniform_with_filter_and_custom_map():
  tree = _shapes_tree()
  out = dists.uniform(tree, 0.7, custom_sparsity_map={'conv/kernel': 0.0, 'embed': 0.9})
  assert out == {
    'conv': {'kernel': 0.0, 'bias': None},
    'dense1': {'kernel': 0.7},
    'dense2': {'kernel': 0.7},
    'embed': 0.9,
  }
  regex = dists.uniform(tree, 0.5, custom_sparsity_map={r'dense\d/kernel': 0.2})
  assert regex['dense1']['kernel'] == regex['dense2']['kernel'] == 0.2


def _erk_reference(shapes, sparsity):
  """Direct solve: densities eps * raw, clipped at 1, total density 1 - sparsity."""
  total = sum(math.prod(s) for s in shapes.values())
  raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
  dense = set()
  while True:
    budget = (1 - sparsity) * total - sum(math.prod(shapes[k]) for k in dense)
    eps = budget / sum(raw[k] * math.prod(shapes[k]) for k in shapes if k not in dense)
    over = [k for k in shapes if k not in dense and eps * raw[k] > 1]
    if not over:
      return {k: 0.0 if k in dense else 1 - eps * raw[k] for k in shapes}
    dense.add(max(over, key=lambda k: raw[k]))


def test_erk_matches_formula_and_budget_with_custom_map():
  tree = _shapes_tree()
  out = dists.erk(tree, 0.9, custom_sparsity_map={'embed': 0.5})
  shapes = {'conv/kernel': (3, 3, 4, 8), 'dense1/kernel': (128, 64), 'dense2/kernel': (64, 10)}
  ref = _erk_reference(shapes, 0.9)
  got = {
    'conv/kernel': out['conv']['kernel'],
    'dense1/kernel': out['dense1']['kernel'],
    'dense2/kernel': out['dense2']['kernel'],
  }
  for k in shapes:
    assert got[k] == pytest.approx(ref[k], abs=1e-12)
  # The ERK layers (custom one excluded) hold exactly 10% of their weights.
  kept = sum((1 - got[k]) * math.prod(s) for k, s in shapes.items())
  assert kept == pytest.approx(0.1 * sum(math.prod(s) for s in shapes.values()))
  assert out['embed'] == 0.5 and out['conv']['bias'] is None
  # Densities follow (sum of dims / number of params): the small layer is densest.
  assert got['dense2/kernel'] < got['dense1/kernel']


def test_erk_rebalances_layers_that_would_exceed_density_one():
  tree = {'tiny': jnp.zeros((2, 2)), 'big': jnp.zeros((512, 512))}
  out = dists.erk(tree, 0.5)
  assert out['tiny'] == 0.0  # eps * raw > 1 -> dense
  kept = 4 + (1 - out['big']) * 512 * 512
  assert kept == pytest.approx(0.5 * (4 + 512 * 512))


def test_custom_map_key_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"key 'dense3/kernel' matches no parameter"):
    dists.uniform(_shapes_tree(), 0.5, custom_sparsity_map={'dense3/kernel': 0.1})
  with pytest.raises(ValueError, match='matches no parameter'):
    prunax.MagnitudePruning(sparsity_distribution_fn={'nope': 0.5}).wrap_optax(
      __import__('optax').sgd(0.1)
    ).init(_shapes_tree())


@pytest.mark.parametrize('bad', [-0.1, 1.0, 1.5, 'x'])
def test_invalid_sparsity(bad):
  with pytest.raises(ValueError, match=r'must be (in|a finite number in) \[0, 1\)'):
    prunax.MagnitudePruning(sparsity=bad)
  with pytest.raises(ValueError, match=r'\[0, 1\)'):
    dists.uniform(_shapes_tree(), 0.5, custom_sparsity_map={'embed': bad})


def test_unknown_distribution_name():
  with pytest.raises(ValueError, match=r"Unknown sparsity distribution 'erdos'"):
    prunax.MagnitudePruning(sparsity=0.5, sparsity_distribution_fn='erdos')


def test_non_float_param_selected_for_pruning():
  tree = {'w': jnp.zeros((4, 4)), 'ids': jnp.zeros((4, 4), jnp.int32)}
  with pytest.raises(TypeError, match=r"Parameter 'ids' has dtype int32"):
    prunax.MagnitudePruning(sparsity=0.5).target_sparsities(tree)


def test_polynomial_schedule_formula():
  s = sched.PolynomialSchedule(update_freq=10, update_start_step=20, update_end_step=100)
  target = 0.8
  for step in [0, 19, 20, 25, 30, 47, 60, 99, 100, 150]:
    if step < 20:
      expected = 0.0
    else:
      last = min(20 + (step - 20) // 10 * 10, 100)
      expected = target * (1 - (1 - (last - 20) / 80) ** 3)
    assert float(s.sparsity(step, target)) == pytest.approx(expected, abs=1e-6), step
  updates = [t for t in range(120) if bool(s.is_update_step(t))]
  assert updates == list(range(20, 101, 10))


def test_polynomial_end_not_on_the_grid_still_reaches_target():
  s = sched.PolynomialSchedule(update_freq=10, update_start_step=0, update_end_step=25)
  assert [t for t in range(40) if bool(s.is_update_step(t))] == [0, 10, 20, 25]
  assert float(s.sparsity(25, 0.5)) == pytest.approx(0.5)
  assert float(s.sparsity(24, 0.5)) < 0.5


def test_one_shot_periodic_and_no_update():
  one = sched.OneShotSchedule(target_step=5)
  assert [t for t in range(10) if bool(one.is_update_step(t))] == [5]
  assert float(one.sparsity(4, 0.7)) == 0.0 and float(one.sparsity(5, 0.7)) == pytest.approx(0.7)
  per = sched.PeriodicSchedule(update_freq=3, update_start_step=2, update_end_step=11)
  assert [t for t in range(20) if bool(per.is_update_step(t))] == [2, 5, 8]
  assert not any(bool(sched.NoUpdateSchedule().is_update_step(t)) for t in range(5))


@pytest.mark.parametrize(
  'make,match',
  [
    (lambda: sched.PolynomialSchedule(10, 50, 20), r'update_end_step=20 precedes'),
    (lambda: sched.PeriodicSchedule(0), r'update_freq must be an integer >= 1, got 0'),
    (lambda: sched.OneShotSchedule(-1), r'target_step must be an integer >= 0'),
    (lambda: sched.PolynomialSchedule(10, 0, 100, initial_sparsity=1.0), r'initial_sparsity'),
  ],
)
def test_bad_schedules(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_schedule_inside_jit_matches_eager():
  s = sched.PolynomialSchedule(update_freq=3, update_start_step=1, update_end_step=13)
  steps = jnp.arange(20)
  jitted = jax.jit(jax.vmap(lambda t: s.sparsity(t, 0.9)))(steps)
  eager = np.array([float(s.sparsity(int(t), 0.9)) for t in steps])
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)

"""``instant_sparsify`` computes its masks in one compiled computation, or eagerly when it must.

Eagerly, every operation of the selection was dispatched and compiled on its own (a
3 x 5 x 7 magnitude pruning took 1.7 s the first time, 0.4 s each time after). Now the
masks come from one jitted computation (the updater static): the same masks as the eager
computation, one trace per updater and shapes, and eager where the inputs are not all
arrays or the algorithm reads concrete values.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import base_updater
from prunax import engines


def params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    'conv': jax.random.normal(k1, (3, 3, 8, 16)),
    'dense': {'kernel': jax.random.normal(k2, (64, 32)), 'bias': jax.random.normal(k3, (32,))},
  }


UPDATERS = {
  'magnitude': prunax.MagnitudePruning(sparsity=0.8),
  'global': prunax.GlobalMagnitudePruning(sparsity=0.7),
  'random': prunax.RandomPruning(sparsity=0.5, rng_seed=jax.random.PRNGKey(3)),
  'n_by_m': prunax.MagnitudePruning(sparsity_type=prunax.sparsity_types.NByM(2, 4)),
  'block': prunax.MagnitudePruning(
    sparsity=0.75, sparsity_type=prunax.sparsity_types.Block((4, 4))
  ),
  'layer_axes': prunax.MagnitudePruning(sparsity=0.6, layer_axes={'conv': 0}),
}


@pytest.mark.parametrize('name', sorted(UPDATERS))
def test_jitted_masks_equal_the_eager_ones_and_trace_once(name):
  updater = UPDATERS[name]
  before = engines._compiled_call._cache_size()
  for seed in (0, 1):
    p = params(seed)
    sparse, masks = updater.instant_sparsify(p)
    eager = base_updater._instant_masks(updater, p, None, {})
    for got, want in zip(jax.tree.leaves(masks), jax.tree.leaves(eager), strict=True):
      assert got.dtype == jnp.bool_
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
      sparse['dense']['kernel'], p['dense']['kernel'] * masks['dense']['kernel']
    )
  # Two calls with new values of the same shapes: one trace (an equal copy of the updater).
  assert engines._compiled_call._cache_size() == before + 1


def test_inputs_that_are_not_all_arrays_are_computed_eagerly():
  p, updater = params(), UPDATERS['magnitude']
  before = engines._compiled_call._cache_size()
  masks = updater.instant_sparsify(dict(p, scale=1.5))[1]  # a Python float among the params
  assert engines._compiled_call._cache_size() == before  # nothing traced
  assert masks['scale'] is None
  want = base_updater._instant_masks(updater, p, None, {})
  for got, ref in zip(jax.tree.leaves(masks), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(got, ref)


@dataclasses.dataclass(frozen=True)
class ConcreteScores(prunax.MagnitudePruning):
  """Scores that read a concrete value (a Python float of the weights' sum)."""

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    sign = 1.0 if float(sum(jnp.sum(x) for x in jax.tree.leaves(params))) > -1e9 else -1.0
    return jax.tree.map(lambda x: sign * jnp.abs(x), params)


def test_an_algorithm_reading_concrete_values_is_computed_eagerly():
  p = params()
  _, masks = ConcreteScores(sparsity=0.8).instant_sparsify(p)
  _, want = prunax.MagnitudePruning(sparsity=0.8).instant_sparsify(p)
  for got, ref in zip(jax.tree.leaves(masks), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(got, ref)


def test_an_unhashable_updater_is_computed_eagerly():
  assert not base_updater.static_jittable(
    dataclasses.replace(UPDATERS['magnitude']).__dict__, params()
  )
  assert not base_updater.static_jittable(UPDATERS['magnitude'], params(), None, {'note': 'text'})
  assert base_updater.static_jittable(UPDATERS['magnitude'], params(), None, {})

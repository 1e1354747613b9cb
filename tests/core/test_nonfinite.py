"""Non-finite weights, scores and gradients: NaN ranks lowest, thresholds stay finite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import sparsity_schedules as sched


def _params(seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), (8, 16))
  return {'w': w}


def test_nan_weights_are_pruned_first_and_counts_stay_exact():
  params = _params()
  nan_at = (np.arange(8), np.arange(8) * 2)
  params = {'w': params['w'].at[nan_at].set(jnp.nan)}
  updater = prunax.MagnitudePruning(sparsity=0.5)
  _, masks = jax.jit(updater.instant_sparsify)(params)
  m = np.asarray(masks['w'])
  assert m.sum() == 64
  assert not m[nan_at].any()  # NaN |w| ranks below every finite magnitude


def test_rigl_grows_finite_gradients_before_nan_ones():
  params = _params()
  updater = prunax.RigL(sparsity=0.75, drop_fraction=0.25, scheduler=sched.PeriodicSchedule(1, 0))
  tx = updater.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  old = np.asarray(prunax.bool_masks(state, params)['w'])
  grads = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (8, 16))) + 1.0
  inactive = np.argwhere(~old)
  poisoned = tuple(inactive[:20].T)  # NaN gradients at 20 inactive weights
  grads = grads.at[poisoned].set(jnp.nan)
  _, state = jax.jit(tx.update)({'w': grads}, state, params)
  new = np.asarray(prunax.bool_masks(state, params)['w'])
  assert new.sum() == old.sum()
  grown = new & ~old
  assert grown.sum() > 0 and not grown[poisoned].any()


@pytest.mark.parametrize(
  'threshold_lr,inner',
  [(1.0, optax.sgd(0.01)), (None, optax.adam(0.01))],
  ids=['own_sgd', 'inner_adam'],
)
def test_autosparse_skips_a_threshold_update_on_nan_gradients(threshold_lr, inner):
  params = _params()
  updater = prunax.AutoSparse(s_init=-2.0, threshold_lr=threshold_lr)
  tx = updater.wrap_optax(inner)
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = {'w': jnp.ones((8, 16)).at[3, 3].set(jnp.nan)}
  initial = prunax.get_sparse_state(state).algorithm_state.threshold_state
  _, state = update(grads, state, params)
  s = float(prunax.get_sparse_state(state).algorithm_state.thresholds['w'])
  assert s == -2.0  # skipped, not NaN (a NaN threshold prunes the whole leaf for good)
  # The thresholds' optimizer state (Adam's moments and count) is left as it was too.
  for a, b in zip(
    jax.tree.leaves(prunax.get_sparse_state(state).algorithm_state.threshold_state),
    jax.tree.leaves(initial),
  ):
    np.testing.assert_array_equal(a, b)
  # The skip is per step: a finite step moves the threshold (from a fresh state, since the
  # NaN gradient also reached the dense weights; optax.apply_if_finite around the pruner
  # skips such steps whole).
  _, fresh = update({'w': jnp.ones((8, 16))}, tx.init(params), params)
  assert np.isfinite(float(prunax.get_sparse_state(fresh).algorithm_state.thresholds['w']))
  assert float(prunax.get_sparse_state(fresh).algorithm_state.thresholds['w']) != -2.0


def test_explicit_hooks_zero_pruned_weights_whatever_they_hold():
  params = _params()
  updater = prunax.MagnitudePruning(sparsity=0.5)
  tx = updater.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  _, state = jax.jit(tx.update)({'w': jnp.zeros((8, 16))}, state, params)
  m = np.asarray(prunax.bool_masks(state, params)['w'])
  pruned = np.argwhere(~m)[:3]
  bad = params['w'].at[tuple(pruned.T)].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  out = np.asarray(updater.post_gradient_update({'w': bad}, state)['w'])
  assert np.all(out[~m] == 0)

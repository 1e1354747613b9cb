"""jaxpruner-style user algorithms: plain ``@dataclasses.dataclass`` subclasses of the
compat classes (jaxpruner's classes are not frozen; prunax's are)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from prunax.compat import jaxpruner

PARAMS = {
  'w': jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32),
  'b': jnp.ones(8),
}
GRADS = {
  'w': jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), jnp.float32),
  'b': jnp.ones(8),
}


def _adam_state(state):
  """The Adam state inside an optimizer state (jaxpruner's extensions search it so)."""
  if isinstance(state, optax.ScaleByAdamState):
    return state
  if isinstance(state, tuple):
    for s in state:
      found = _adam_state(s)
      if found is not None:
        return found
  return None


def _zero_adam(state):
  if isinstance(state, optax.ScaleByAdamState):
    return state._replace(
      mu=jax.tree.map(jnp.zeros_like, state.mu), nu=jax.tree.map(jnp.zeros_like, state.nu)
    )
  if isinstance(state, tuple) and not hasattr(state, '_fields'):
    return tuple(_zero_adam(s) for s in state)
  if isinstance(state, tuple):
    return type(state)(*(_zero_adam(s) for s in state))
  return state


@dataclasses.dataclass
class GradientTimesWeight(jaxpruner.BaseUpdater):
  """Scores |w|^exponent * |g|; optionally zeroes Adam's moments after each update."""

  exponent: float = 1.0
  reset_adam: bool = False

  def calculate_scores(self, params, sparse_state=None, grads=None):
    del sparse_state
    return jax.tree.map(lambda p, g: jnp.abs(p) ** self.exponent * jnp.abs(g), params, grads)


@dataclasses.dataclass
class ResetAdam(GradientTimesWeight):
  """Also zeroes Adam's moments after its mask updates (jaxpruner's adam-fisher does)."""

  def update_state(self, sparse_state, params, grads):
    sparse_state = super().update_state(sparse_state, params, grads)
    if self.reset_adam:
      sparse_state = sparse_state._replace(inner_state=_zero_adam(sparse_state.inner_state))
    return sparse_state


@dataclasses.dataclass
class CyclicMagnitude(jaxpruner.algorithms.MagnitudePruning):
  """Sets its own schedule in ``__post_init__``, as jaxpruner's AC/DC does."""

  cycle_steps: int = 0

  def __post_init__(self):
    super().__post_init__()
    self.scheduler = jaxpruner.PeriodicSchedule(
      update_freq=1, update_start_step=0, update_end_step=2**31 - 1
    )


def _one_update(updater):
  tx = updater.wrap_optax(optax.adam(1e-3))
  state = tx.init(PARAMS)
  updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
  return optax.apply_updates(PARAMS, updates), state


def test_a_user_dataclass_prunes_by_its_own_scores():
  updater = GradientTimesWeight(
    sparsity=0.5, exponent=2.0, scheduler=jaxpruner.OneShotSchedule(target_step=0)
  )
  assert isinstance(updater, GradientTimesWeight) and isinstance(updater, jaxpruner.BaseUpdater)
  params, _ = _one_update(updater)
  scores = np.abs(np.asarray(PARAMS['w'])) ** 2 * np.abs(np.asarray(GRADS['w']))
  kept = np.asarray(params['w']) != 0
  assert kept.sum() == 32  # 50% of 64; the bias (1-D) stays dense
  assert scores[kept].min() > scores[~kept].max()
  assert bool(jnp.all(params['b'] != 0))


def test_an_update_state_override_runs_in_the_wrapped_step_as_jaxpruner_orders_it():
  # jaxpruner's order: on a mask-update step update_state (here: the base's masks, then
  # Adam's moments zeroed), then the inner optimizer, skipped with skip_gradients.
  updater = ResetAdam(
    sparsity=0.5,
    reset_adam=True,
    skip_gradients=True,
    scheduler=jaxpruner.PeriodicSchedule(update_freq=2, update_start_step=0, update_end_step=10),
  )
  tx = updater.wrap_optax(optax.adam(1e-3))
  step = jax.jit(tx.update)
  state = tx.init(PARAMS)
  updates, state = step(GRADS, state, PARAMS)  # step 0: a mask update
  params = optax.apply_updates(PARAMS, updates)
  scores = np.abs(np.asarray(PARAMS['w'])) * np.abs(np.asarray(GRADS['w']))
  kept = np.asarray(state.masks['w']) == 1
  assert kept.sum() == 32 and scores[kept].min() > scores[~kept].max()
  np.testing.assert_array_equal(np.asarray(params['w']) != 0, kept)  # sparse params
  np.testing.assert_array_equal(params['w'][kept], PARAMS['w'][kept])  # no inner step
  adam = _adam_state(state.inner_state)
  assert all(float(jnp.abs(m).sum()) == 0 for m in jax.tree.leaves((adam.mu, adam.nu)))
  updates, state = step(GRADS, state, params)  # step 1: no update, Adam on kept weights
  adam = _adam_state(state.inner_state)
  np.testing.assert_array_equal(np.asarray(adam.mu['w']) != 0, kept)
  assert int(state.count) == 2


def test_an_update_state_override_runs_in_a_hand_written_loop():
  updater = ResetAdam(sparsity=0.5, reset_adam=True)
  adam = optax.adam(1e-3)
  state = updater.init_state(PARAMS, adam.init(PARAMS))
  _, inner = adam.update(GRADS, state.inner_state, PARAMS)
  state = state._replace(inner_state=inner)
  assert float(jnp.abs(_adam_state(state.inner_state).nu['w']).sum()) > 0
  new = updater.update_state(state, PARAMS, GRADS)
  # The same tree (a lax.cond branch in jaxpruner's loops): unpruned leaves' masks too.
  assert jax.tree.structure(new) == jax.tree.structure(state)
  for moment in (_adam_state(new.inner_state).mu, _adam_state(new.inner_state).nu):
    assert all(float(jnp.abs(m).sum()) == 0 for m in jax.tree.leaves(moment))
  assert int(new.masks['w'].sum()) == 32


def test_overrides_no_wrapped_step_calls_are_refused_by_name():
  @dataclasses.dataclass
  class OwnMasks(jaxpruner.MagnitudePruning):
    def create_masks(self, scores, sparsities=None, target_sparsity=None):
      return super().create_masks(scores, sparsities, target_sparsity)

  with pytest.raises(TypeError, match='OwnMasks overrides create_masks, which the wrapped'):
    OwnMasks(sparsity=0.5).wrap_optax(optax.sgd(0.1))

  @dataclasses.dataclass
  class SteWithState(jaxpruner.SteMagnitudePruning):
    def update_state(self, sparse_state, params, grads):
      return super().update_state(sparse_state, params, grads)

  with pytest.raises(TypeError, match='SteWithState overrides update_state'):
    SteWithState(sparsity=0.5).wrap_optax(optax.sgd(0.1))


def test_post_init_assignments_hold_and_later_ones_rebuild():
  updater = CyclicMagnitude(sparsity=0.5, cycle_steps=3)
  assert isinstance(updater.scheduler, jaxpruner.PeriodicSchedule)
  assert updater.scheduler.update_freq == 1 and updater.cycle_steps == 3
  before = hash(updater)
  updater.sparsity = 0.75  # checked and resolved as in the constructor
  assert updater.sparsity == 0.75 and hash(updater) != before
  with pytest.raises(ValueError, match='sparsity'):
    updater.sparsity = 2.0
  sparse, _ = updater.instant_sparsify(PARAMS)
  assert int(jnp.sum(sparse['w'] == 0)) == 48
  copy = dataclasses.replace(updater, cycle_steps=5)
  assert type(copy) is type(updater) and copy.cycle_steps == 5 and copy.sparsity == 0.75


def test_registered_user_algorithms_are_built_from_configs():
  jaxpruner.register_algorithm('gradient-times-weight', GradientTimesWeight)
  try:
    config = ml_collections.ConfigDict()
    config.algorithm = 'gradient-times-weight'
    config.sparsity = 0.25
    config.dist_type = 'uniform'
    config.exponent = 3.0
    config.update_start_step = 5
    config.update_end_step = 5  # jaxpruner's rule: start == end is one shot
    updater = jaxpruner.create_updater_from_config(config)
    assert isinstance(updater, GradientTimesWeight)
    assert updater.exponent == 3.0 and updater.sparsity == 0.25
    assert isinstance(updater.scheduler, jaxpruner.OneShotSchedule)
    assert updater.scheduler.target_step == 5 and updater.packed_masks is False
    assert 'gradient-times-weight' in jaxpruner.all_algorithm_names()
  finally:
    del jaxpruner.ALGORITHM_REGISTRY['gradient-times-weight']


def test_undecorated_frozen_and_nested_subclasses():
  class Negated(jaxpruner.MagnitudePruning):  # no decorator: the base's fields
    def calculate_scores(self, params, sparse_state=None, grads=None):
      return jax.tree.map(jnp.negative, super().calculate_scores(params, sparse_state, grads))

  sparse, _ = Negated(sparsity=0.5).instant_sparsify(PARAMS)
  w = np.abs(np.asarray(PARAMS['w']))
  kept = np.asarray(sparse['w']) != 0
  assert kept.sum() == 32 and w[kept].max() < w[~kept].min()  # the smallest are kept

  @dataclasses.dataclass(frozen=True)  # the form that worked before
  class Frozen(jaxpruner.MagnitudePruning):
    label: str = 'x'

  assert Frozen(sparsity=0.5, label='y').label == 'y'

  @dataclasses.dataclass
  class Deeper(GradientTimesWeight):
    extra: int = 1

  deeper = Deeper(sparsity=0.5, exponent=2.0, extra=4)
  assert (deeper.exponent, deeper.extra) == (2.0, 4)
  assert isinstance(deeper, GradientTimesWeight) and isinstance(deeper, jaxpruner.BaseUpdater)


def test_two_bases_are_refused_with_the_class_named():
  class Other:
    pass

  with pytest.raises(TypeError, match='Mixed: a jaxpruner-style algorithm derives from one'):

    class Mixed(jaxpruner.MagnitudePruning, Other):
      pass

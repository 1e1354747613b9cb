"""The optimizer state has no None leaves: orbax and flax serialization round-trip it."""

import flax.serialization
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import prunax
from prunax import sparsity_schedules as sched

from .helpers import loss_fn
from .helpers import make_batch
from .helpers import mlp_params

ALGORITHMS = {
  'magnitude': lambda: prunax.MagnitudePruning(
    sparsity=0.75, scheduler=sched.PolynomialSchedule(1, 0, 4)
  ),
  'rigl': lambda: prunax.RigL(sparsity=0.75, scheduler=sched.PeriodicSchedule(2, 1)),
  'ste': lambda: prunax.SteMagnitudePruning(sparsity=0.75),
  'autosparse': lambda: prunax.AutoSparse(s_init=-2.0, training_steps=10),
  'autosparse_own_sgd': lambda: prunax.AutoSparse(s_init=-2.0, threshold_lr=1.0),
}


def _step(tx):
  batch = make_batch()

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _assert_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('algorithm', sorted(ALGORITHMS))
def test_no_none_leaves(algorithm):
  state = ALGORITHMS[algorithm]().wrap_optax(optax.adam(1e-2)).init(mlp_params())
  flat = jax.tree_util.tree_flatten(state, is_leaf=lambda x: x is None)[0]
  assert all(x is not None for x in flat)


@pytest.mark.parametrize('algorithm', sorted(ALGORITHMS))
def test_orbax_and_flax_round_trip_and_training_continues(algorithm, tmp_path):
  tx = ALGORITHMS[algorithm]().wrap_optax(optax.adam(1e-2))
  step = _step(tx)
  params = mlp_params()
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)

  # orbax: save, restore into the structure of a fresh state.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', {'params': params, 'state': state})
  checkpointer.wait_until_finished()
  target = {'params': params, 'state': tx.init(params)}
  restored = checkpointer.restore(tmp_path / 'ckpt', target)
  _assert_identical(restored['state'], state)

  # flax serialization (msgpack bytes and state dicts).
  from_bytes = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
  _assert_identical(from_bytes, state)

  # Training from the restored state is identical to training on.
  p1, s1 = params, state
  p2, s2 = restored['params'], restored['state']
  for _ in range(3):
    p1, s1 = step(p1, s1)
    p2, s2 = step(p2, s2)
  _assert_identical((p1, s1), (p2, s2))

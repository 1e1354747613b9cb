"""The optimizers of large models inside (and around) a pruner: any state shape, any order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import sparsity_schedules as sched

from .helpers import loss_fn
from .helpers import make_batch
from .helpers import mlp_params

STEPS = 20
SPARSITY = 0.75


def _labels(params):
  return jax.tree.map(lambda x: 'decay' if x.ndim >= 2 else 'no_decay', params)


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


INNER = {
  'masked': lambda: optax.chain(
    optax.masked(optax.add_decayed_weights(1e-2), _decay_mask), optax.adam(1e-2)
  ),
  'multi_transform': lambda: optax.multi_transform(
    {'decay': optax.adamw(1e-2, weight_decay=1e-2), 'no_decay': optax.adam(1e-2)}, _labels
  ),
  'inject_hyperparams': lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
  'chain': lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
  'adafactor_factored': lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
  'adafactor': lambda: optax.adafactor(1e-2, factored=False),
  'lion': lambda: optax.lion(1e-3),
  'muon': lambda: optax.contrib.muon(1e-2),
  'cocob': lambda: optax.contrib.cocob(),
  'schedule_free_adamw': lambda: optax.contrib.schedule_free_adamw(1e-2),
}
OUTER = {  # transformations whose place is around the pruner
  'multi_steps': lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
  'apply_if_finite': lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
}
ALGORITHMS = {
  'rigl': lambda: prunax.RigL(sparsity=SPARSITY, scheduler=sched.PeriodicSchedule(3, 1)),
  'set': lambda: prunax.SET(sparsity=SPARSITY, scheduler=sched.PeriodicSchedule(3, 1)),
  'magnitude': lambda: prunax.MagnitudePruning(
    sparsity=SPARSITY, scheduler=sched.PolynomialSchedule(2, 0, 8)
  ),
  'ste': lambda: prunax.SteMagnitudePruning(sparsity=SPARSITY),
}


def _train(tx, params):
  batch = make_batch()

  @jax.jit
  def train(params, state):
    def body(carry, _):
      p, s = carry
      grads = jax.grad(loss_fn)(p, batch)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(body, (params, state), None, length=STEPS)[0]

  return train(params, tx.init(params))


def _check_exact(params, state):
  masks = prunax.bool_masks(state, params)
  for (name, p), m in zip(
    prunax.sparsity_distributions.named_leaves(params),
    jax.tree.leaves(masks, is_leaf=lambda x: x is None),
  ):
    assert np.all(np.isfinite(np.asarray(p))), name
    if m is None:
      continue
    m = np.asarray(m)
    assert m.sum() == m.size - round(SPARSITY * m.size), name
    assert np.all(np.asarray(p)[~m] == 0), name


@pytest.mark.parametrize('algorithm', sorted(ALGORITHMS))
@pytest.mark.parametrize('inner', sorted(INNER) + sorted(OUTER))
def test_optimizer_runs_exact_and_finite(inner, algorithm):
  pruner = ALGORITHMS[algorithm]()
  if inner in OUTER:
    tx = OUTER[inner](pruner.wrap_optax(optax.adam(1e-2)))
  else:
    tx = pruner.wrap_optax(INNER[inner]())
  params, state = _train(tx, mlp_params())
  _check_exact(params, state)


@pytest.mark.parametrize('inner', sorted(INNER))
def test_autosparse_thresholds_train_with_every_optimizer(inner):
  # The thresholds take the inner optimizer's steps (their state a tree like the params),
  # stay finite, and the params are the soft threshold of the dense weights.
  tx = prunax.AutoSparse(s_init=-2.0, threshold_weight_decay=0.1).wrap_optax(INNER[inner]())
  params, state = _train(tx, mlp_params())
  sparse = prunax.get_sparse_state(state)
  for name in ('layer0', 'layer1'):
    s = float(sparse.algorithm_state.thresholds[name]['kernel'])
    assert np.isfinite(s) and s != -2.0, (name, s)
    d = np.asarray(sparse.algorithm_state.dense_params[name]['kernel'])
    t = 1 / (1 + np.exp(-s))
    np.testing.assert_allclose(
      params[name]['kernel'], np.sign(d) * np.maximum(np.abs(d) - t, 0), atol=1e-6
    )
  assert jax.tree.leaves(sparse.algorithm_state.threshold_state)


def test_regrown_weights_restart_from_the_inner_init():
  # cocob's per-weight state does not start at zero: zeroing it made regrown weights 0/0.
  params = mlp_params()
  inner = optax.contrib.cocob()
  pruner = prunax.RigL(sparsity=SPARSITY, scheduler=sched.PeriodicSchedule(1, 0))
  tx = pruner.wrap_optax(inner)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, make_batch())
  update = jax.jit(tx.update)
  for _ in range(3):  # masks change at every step: weights are dropped and regrown
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  masks = prunax.bool_masks(state, params)
  old = prunax.get_sparse_state(state).inner_state
  reset = prunax.engines._reset_inactive(inner, old, masks, params)
  fresh = inner.init(params)
  # cocob is a chain; its COCOBState holds one tree like params per field.
  (old,) = [x for x in old if isinstance(x, optax.contrib.COCOBState)]
  (reset,) = [x for x in reset if isinstance(x, optax.contrib.COCOBState)]
  (fresh,) = [x for x in fresh if isinstance(x, optax.contrib.COCOBState)]
  for field in old._fields:  # every field of cocob's state is a tree like params
    for name in ('layer0', 'layer1'):
      for leaf in ('kernel', 'bias'):
        r, f, v = (np.asarray(getattr(t, field)[name][leaf]) for t in (reset, fresh, old))
        m = masks[name][leaf]
        if m is None:  # not pruned: untouched
          np.testing.assert_array_equal(r, v)
          continue
        m = np.asarray(m)
        np.testing.assert_array_equal(r[~m], f[~m], err_msg=f'{field} {name}')
        np.testing.assert_array_equal(r[m], v[m], err_msg=f'{field} {name}')


def test_factored_moments_are_left_alone():
  # adafactor's factored second moments (row and column vectors) are not per-weight.
  params = mlp_params()
  inner = optax.adafactor(1e-2, min_dim_size_to_factor=4)
  state = inner.init(params)
  state = jax.tree.map(lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  masks = jax.tree.map(lambda x: jnp.zeros(x.shape, bool) if x.ndim == 2 else None, params)
  reset = prunax.engines._reset_inactive(inner, state, masks, params)
  for r, v in zip(jax.tree.leaves(reset), jax.tree.leaves(state)):
    if np.ndim(r) == 1 or np.ndim(r) == 0:
      np.testing.assert_array_equal(r, v)


@pytest.mark.parametrize('wrong', sorted(OUTER))
def test_wrong_order_is_rejected_with_the_right_one(wrong):
  pruner = prunax.RigL(sparsity=SPARSITY)
  tx = pruner.wrap_optax(OUTER[wrong](optax.adam(1e-2)))
  with pytest.raises(ValueError, match=r'put it outside: optax\.'):
    tx.init(mlp_params())


def test_multi_steps_outside_counts_real_steps():
  pruner = prunax.RigL(sparsity=SPARSITY, scheduler=sched.PeriodicSchedule(2, 0))
  tx = optax.MultiSteps(pruner.wrap_optax(optax.adam(1e-2)), every_k_schedule=4)
  params = mlp_params()
  state = tx.init(params)
  step = jax.jit(functools.partial(tx.update))
  grads = jax.grad(loss_fn)(params, make_batch())
  for _ in range(8):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert int(prunax.get_sparse_state(state).count) == 2  # 8 micro-steps, 2 real steps


def test_tree_map_params_on_wrapped_transformations():
  params = mlp_params()
  specs = jax.tree.map(lambda x: f'spec{x.ndim}', params)
  pruner = prunax.MagnitudePruning(sparsity=SPARSITY)
  for tx in (
    pruner.wrap_optax(optax.adam(1e-2)),
    optax.chain(optax.clip_by_global_norm(1.0), pruner.wrap_optax(optax.adam(1e-2))),
    pruner.wrap_optax(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))),
  ):
    state = tx.init(params)
    mapped = optax.tree_utils.tree_map_params(
      tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: 'other'
    )
    sparse = prunax.get_sparse_state(mapped)
    inner = optax.tree_utils.tree_get(sparse.inner_state, 'mu')
    assert inner == specs
    assert sparse.masks == 'other' and sparse.count == 'other'

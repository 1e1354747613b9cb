"""Pruning with Adafactor as t5x configures T5: the optax port of t5x's ``adafactor.Adafactor``
(the README's settings) checked against t5x's own optimizer, with and without the pruner."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import prunax_t5x

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec('t5x') is None, reason='t5x is not installed'
)

# The README's settings: optax.adafactor as t5x's Adafactor(decay_rate=0.8, step_offset=0)
# of t5x's T5.1.1 gin files.
T5X_ADAFACTOR = dict(
  decay_rate=0.8,
  momentum=None,
  clipping_threshold=1.0,
  multiply_by_parameter_scale=True,
  min_dim_size_to_factor=128,
  eps=1e-30,
  factored=True,
)
# The shapes and logical axes of t5x's T5.1.1 (t5x/examples/t5): 2-D kernels, factored
# when both dimensions reach 128, small ones not; 1-D layer-norm scales.
KEYS = jax.random.split(jax.random.PRNGKey(0), 4)
PARAMS = {
  'token_embedder': {'embedding': jax.random.normal(KEYS[0], (384, 64))},
  'mlp': {
    'wi': 0.05 * jax.random.normal(KEYS[1], (128, 256)),
    'wo': 0.05 * jax.random.normal(KEYS[2], (256, 128)),
  },
  'attention': {'query': 0.05 * jax.random.normal(KEYS[3], (64, 96))},
  'norm': {'scale': jnp.ones(128)},
}
AXES = {
  'token_embedder': {'embedding': P('vocab', 'embed')},
  'mlp': {'wi': P('embed', 'mlp'), 'wo': P('mlp', 'embed')},
  'attention': {'query': P('embed', 'joined_kv')},
  'norm': {'scale': P('embed')},
}
LEARNING_RATE = optax.linear_schedule(1e-2, 5e-3, 4)
STEPS = 4


def _t5x_adafactor_params(params):
  """``STEPS`` updates of t5x's Adafactor as its T5.1.1 gin files configure it."""
  from t5x import adafactor
  from t5x import optimizers

  optimizer_def = adafactor.Adafactor(
    decay_rate=0.8, step_offset=0, logical_factor_rules=adafactor.standard_logical_factor_rules()
  )
  optimizer_def.set_param_axes(AXES)  # t5x's partitioner does this
  optimizer = optimizers.Optimizer(optimizer_def, optimizer_def.init_state(params), params)
  for step in range(STEPS):
    optimizer = optimizer.apply_gradient(
      _grads(optimizer.target, step), learning_rate=LEARNING_RATE(step)
    )
  return optimizer.target


def _grads(params, step):
  return jax.tree.map(lambda p: 0.1 * jnp.cos(3.0 * p + step), params)


def _optax_params(tx, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(STEPS):
    updates, state = update(_grads(params, step), state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('pruned', [False, True])
def test_optax_port_matches_t5x_adafactor_on_t5_1_1_shapes(pruned):
  tx = optax.adafactor(learning_rate=LEARNING_RATE, **T5X_ADAFACTOR)
  if pruned:  # Pruning starts after these steps: until then the pruner changes nothing.
    tx = prunax_t5x.pruned_optax(tx, 'magnitude', 0.5, update_freq=1, update_start_step=STEPS)
  want = _t5x_adafactor_params(PARAMS)
  got = _optax_params(tx, PARAMS)
  for (path, a), b, p in zip(
    jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), jax.tree.leaves(PARAMS)
  ):
    # The moves of the params agree to float rounding (the factored moments are reduced in
    # another order); each param moved by at least 6e-4.
    assert float(jnp.max(jnp.abs(b - p))) > 5e-4
    np.testing.assert_allclose(
      a - p, b - p, rtol=1e-3, atol=2e-8, err_msg=jax.tree_util.keystr(path)
    )


def test_optax_port_differs_from_t5x_adafactor_on_3d_kernels():
  """The README's caveat: t5x factors a (embed, heads, kv) kernel as rows x (heads, kv) by
  its logical axes, optax over its two largest dimensions; the updates differ."""
  from t5x import adafactor
  from t5x import optimizers

  params = {'query': 0.05 * jax.random.normal(KEYS[0], (128, 8, 64))}
  optimizer_def = adafactor.Adafactor(
    decay_rate=0.8, step_offset=0, logical_factor_rules=adafactor.standard_logical_factor_rules()
  )
  optimizer_def.set_param_axes({'query': P('embed', 'heads', 'kv')})
  optimizer = optimizers.Optimizer(optimizer_def, optimizer_def.init_state(params), params)
  want = optimizer.apply_gradient(_grads(params, 0), learning_rate=1e-2).target
  tx = optax.adafactor(learning_rate=1e-2, **T5X_ADAFACTOR)
  updates, _ = tx.update(_grads(params, 0), tx.init(params), params)
  got = optax.apply_updates(params, updates)
  relative = jnp.abs(got['query'] - want['query']) / jnp.abs(want['query'] - params['query'])
  assert float(jnp.max(relative)) > 0.05

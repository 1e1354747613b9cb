"""SR-STE: sparse-refined straight-through estimator for N:M sparsity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunax

from .helpers import loss_fn
from .helpers import make_batch
from .helpers import mlp_params
from .helpers import run


def test_one_step_adds_decay_on_pruned_weights():
  decay = 0.5
  tx = prunax.SRSTE(decay=decay).wrap_optax(optax.sgd(1.0))
  params, batch = mlp_params(), make_batch()
  state = tx.init(params)
  updates, state = tx.update(jax.grad(loss_fn)(params, batch), state, params)
  params = optax.apply_updates(params, updates)
  m = prunax.bool_masks(state, params)['layer1']['kernel']
  # 2:4 along the input axis (-2) of the (in, out) kernel.
  np.testing.assert_array_equal(np.moveaxis(np.asarray(m), -2, -1).reshape(-1, 4).sum(-1), 2)
  w = state.algorithm_state.dense_params['layer1']['kernel']
  g = jax.grad(loss_fn)(params, batch)['layer1']['kernel']
  _, new_state = tx.update(jax.grad(loss_fn)(params, batch), state, params)
  np.testing.assert_allclose(
    new_state.algorithm_state.dense_params['layer1']['kernel'],
    w - (g + decay * jnp.where(m, 0.0, w)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_pruned_weights_shrink_relative_to_plain_ste():
  params = mlp_params()
  pruned_norm = {}
  for decay in (0.0, 0.2):
    updater = prunax.create_updater_from_config(
      {'algorithm': 'sr_ste', 'sparsity_type': 'nm_2,4', 'sparsity': 0.5, 'extra': {'decay': decay}}
    )
    _, state, _ = run(updater.wrap_optax(optax.sgd(0.1)), params, 30)
    total = 0.0
    for n in ('layer0', 'layer1'):
      m = prunax.bool_masks(state, params)[n]['kernel']
      total += float(jnp.sum(jnp.abs(state.algorithm_state.dense_params[n]['kernel'])[~m]))
    pruned_norm[decay] = total
  assert pruned_norm[0.2] < 0.8 * pruned_norm[0.0], pruned_norm

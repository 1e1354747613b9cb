"""Top-KAST and Top-KAST with gradient annealing (TopKAST*+GA)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax

from .helpers import loops_in
from .helpers import loss_fn
from .helpers import make_batch
from .helpers import mlp_params

KERNELS = ('layer0', 'layer1')


def _two_steps(updater):
  """Returns (state before step 2, params the model sees, grads, state after step 2)."""
  tx = updater.wrap_optax(optax.sgd(1.0))
  params, batch = mlp_params(), make_batch()
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  grads = jax.grad(loss_fn)(params, batch)
  _, new_state = jax.jit(tx.update)(grads, state, params)
  return state, params, grads, new_state


def _top(w, keep):
  return jnp.abs(w) >= jnp.sort(jnp.abs(w).ravel())[::-1][keep - 1]


@pytest.mark.parametrize('alpha', [1.0, 0.3])
def test_gradients_backward_set_and_penalty(alpha):
  penalty = 0.1
  updater = prunax.TopKAST(sparsity=0.8, backward_sparsity=0.5, penalty=penalty, alpha=alpha)
  state, params, grads, new_state = _two_steps(updater)
  for n in KERNELS:
    w = state.algorithm_state.dense_params[n]['kernel']
    a = prunax.bool_masks(state, params)[n]['kernel']
    assert int(a.sum()) == w.size - round(0.8 * w.size)
    np.testing.assert_array_equal(a, _top(w, int(a.sum())))  # forward set: top-k of |w|
    np.testing.assert_array_equal(params[n]['kernel'], jnp.where(a, w, 0))
    b = _top(w, w.size - round(0.5 * w.size))
    g = grads[n]['kernel']
    expected = jnp.where(
      a, g + penalty * w, jnp.where(b, alpha * g + penalty / (a.sum() / a.size) * w, 0.0)
    )
    np.testing.assert_allclose(
      new_state.algorithm_state.dense_params[n]['kernel'], w - expected, rtol=1e-5, atol=1e-6
    )
    outside = ~b
    assert int(outside.sum()) == round(0.5 * w.size)
    np.testing.assert_array_equal(
      new_state.algorithm_state.dense_params[n]['kernel'][outside], w[outside]
    )


def test_topkast_ga_anneals_and_is_registered():
  with pytest.raises(ValueError, match='needs alpha'):
    prunax.TopKASTGA(sparsity=0.8)
  with pytest.raises(ValueError, match='backward set must contain'):
    prunax.TopKAST(sparsity=0.5, backward_sparsity=0.8)
  updater = prunax.create_updater_from_config(
    {
      'algorithm': 'topkast_ga',
      'sparsity': 0.8,
      'extra': {'alpha': {'kind': 'linear', 'alpha0': 0.5, 'decay_steps': 2}},
    }
  )
  assert isinstance(updater, prunax.TopKASTGA)
  assert float(updater.alpha(1)) == pytest.approx(0.25)
  state, params, grads, new_state = _two_steps(updater)  # step 2 is step index 1: alpha = 0.25
  w = state.algorithm_state.dense_params['layer1']['kernel']
  a = prunax.bool_masks(state, params)['layer1']['kernel']
  np.testing.assert_allclose(
    new_state.algorithm_state.dense_params['layer1']['kernel'],
    w - jnp.where(a, 1.0, 0.25) * grads['layer1']['kernel'],
    rtol=1e-5,
    atol=1e-6,
  )
  assert prunax.get_algorithm('topkast') is prunax.TopKAST


@pytest.mark.parametrize('leaves', [2, 6])
@pytest.mark.parametrize('backward_sparsity, loops', [(0.0, 0), (0.5, 1)])
def test_the_backward_set_is_one_selection_for_every_leaf(backward_sparsity, loops, leaves):
  # B at every step: one selection loop (its tie-break included) for all leaves, none when
  # B is every weight (TopKAST*). A selection per leaf compiled the step of 16 layers of
  # 256 x 256 in 6.2 s (13x dense).
  params = mlp_params(sizes=(48,) * (leaves + 1))  # kernels of 2304 weights: searched
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool) if p.ndim == 2 else None, params)
  updater = prunax.TopKAST(sparsity=0.8, backward_sparsity=backward_sparsity)
  jaxpr = jax.make_jaxpr(updater.backward_masks)(params, masks)
  assert loops_in(jaxpr.jaxpr) == loops
  top = jax.jit(updater.backward_masks)(
    params, {n: {'kernel': ~m['kernel'], 'bias': None} for n, m in masks.items()}
  )
  for n in masks:
    w, b = params[n]['kernel'], np.asarray(top[n]['kernel'])
    keep = w.size - round(backward_sparsity * w.size)
    # B holds A (here every weight outside an empty forward set: none) and the top of |w|.
    np.testing.assert_array_equal(b, _top(w, keep))

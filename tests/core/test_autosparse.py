"""AutoSparse, STR and gradient annealing (AutoSparse paper, sections 2-3 and 5)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import prunax
from prunax.algorithms.autosparse import soft_threshold

from .conftest import loss_fn
from .conftest import make_batch
from .conftest import mlp_params

KERNELS = ('layer0', 'layer1')


# ------------------------------------------------------------------------- reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def h_alpha(x, alpha):
  """relu with the proxy derivative of eq. (1): 1 for x > 0, alpha for x <= 0."""
  return jax.nn.relu(x)


def _h_fwd(x, alpha):
  return jax.nn.relu(x), x


def _h_bwd(alpha, x, g):
  return (g * jnp.where(x > 0, 1.0, alpha),)


h_alpha.defvjp(_h_fwd, _h_bwd)


def reparam_loss(dense, s, alpha, batch):
  """Loss of the explicit reparameterised forward pass (eq. 7) over the MLP's kernels."""
  params = jax.tree.map(lambda x: x, dense)
  for name in KERNELS:
    w = dense[name]['kernel']
    params[name]['kernel'] = jnp.sign(w) * h_alpha(jnp.abs(w) - jax.nn.sigmoid(s[name]), alpha)
  return loss_fn(params, batch)


def _state_at(updater, dense, s):
  """A wrapped-SGD state whose dense weights are ``dense`` and thresholds ``s``."""
  tx = updater.wrap_optax(optax.sgd(1.0))
  state = tx.init(dense)
  masks = {
    n: {
      'kernel': (jnp.abs(dense[n]['kernel']) > jax.nn.sigmoid(s[n])).astype(jnp.uint8),
      'bias': None,
    }
    for n in KERNELS
  }
  state = state._replace(
    masks=masks,
    dense_params={n: {'kernel': dense[n]['kernel'], 'bias': None} for n in KERNELS},
    thresholds={n: {'kernel': jnp.float32(s[n]), 'bias': None} for n in KERNELS},
  )
  params = {
    n: {'kernel': soft_threshold(dense[n]['kernel'], s[n]), 'bias': dense[n]['bias']}
    for n in KERNELS
  }
  return tx, state, params


S = {'layer0': -1.2, 'layer1': -1.6}  # thresholds 0.23 and 0.17: both sets non-empty


@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_proxy_and_threshold_gradients_match_reparameterised_forward(alpha):
  dense, batch = mlp_params(), make_batch()
  lr, wd = 0.5, 0.01
  updater = prunax.AutoSparse(alpha=alpha, threshold_lr=lr, threshold_weight_decay=wd)
  tx, state, params = _state_at(updater, dense, S)
  assert 0.2 < float(jnp.mean(prunax.bool_masks(state, params)['layer0']['kernel'])) < 0.9
  grads = jax.grad(loss_fn)(params, batch)
  _, new_state = jax.jit(tx.update)(grads, state, params)

  ref_w, ref_s = jax.grad(reparam_loss, argnums=(0, 1))(dense, S, alpha, batch)
  for n in KERNELS:
    np.testing.assert_allclose(
      new_state.dense_params[n]['kernel'],
      dense[n]['kernel'] - ref_w[n]['kernel'],
      rtol=1e-5,
      atol=1e-6,
    )
    expected_s = S[n] - lr * (ref_s[n] + wd * S[n])
    np.testing.assert_allclose(new_state.thresholds[n]['kernel'], expected_s, rtol=1e-5)
    assert abs(float(ref_s[n])) > 1e-4  # the threshold gradient is not trivially zero
  if alpha == 0.0:  # STR: pruned weights receive no gradient.
    pruned = ~prunax.bool_masks(state, params)['layer0']['kernel']
    np.testing.assert_array_equal(
      new_state.dense_params['layer0']['kernel'][pruned], dense['layer0']['kernel'][pruned]
    )


def test_backward_set_limits_gradients_to_topk():
  dense, batch = mlp_params(), make_batch()
  updater = prunax.AutoSparse(alpha=0.5, backward_sparsity=0.5, threshold_lr=0.0)
  s = {'layer0': -0.8, 'layer1': -1.0}  # A holds under half of each leaf
  tx, state, params = _state_at(updater, dense, s)
  grads = jax.grad(loss_fn)(params, batch)
  _, new_state = tx.update(grads, state, params)
  for n in KERNELS:
    w = dense[n]['kernel']
    active = jnp.abs(w) > jax.nn.sigmoid(s[n])
    k = w.size - round(0.5 * w.size)
    in_b = (jnp.abs(w) >= jnp.sort(jnp.abs(w).ravel())[::-1][k - 1]) | active
    scale = jnp.where(active, 1.0, jnp.where(in_b, 0.5, 0.0))
    np.testing.assert_allclose(
      new_state.dense_params[n]['kernel'], w - grads[n]['kernel'] * scale, rtol=1e-6, atol=1e-7
    )
    assert int(jnp.sum(active)) < k == int(jnp.sum(in_b))  # A < B < all weights


def test_forward_params_are_soft_thresholded_and_masks_match():
  updater = prunax.create_updater_from_config(
    {'algorithm': 'str', 'extra': {'s_init': -2.0, 'threshold_lr': 5.0}}
  )
  assert isinstance(updater, prunax.STR)
  tx = updater.wrap_optax(optax.sgd(0.1))
  params, batch = mlp_params(), make_batch()
  state = tx.init(params)
  for _ in range(3):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for n in KERNELS:
    d = np.asarray(state.dense_params[n]['kernel'])
    t = 1.0 / (1.0 + np.exp(-float(state.thresholds[n]['kernel'])))
    np.testing.assert_allclose(
      params[n]['kernel'], np.sign(d) * np.maximum(np.abs(d) - t, 0.0), atol=1e-6
    )
    np.testing.assert_array_equal(prunax.bool_masks(state, params)[n]['kernel'], np.abs(d) > t)
    np.testing.assert_array_equal(params[n]['kernel'] != 0, np.abs(d) > t)
  summary = prunax.summarize_thresholds(state)
  assert summary['s/layer0/kernel'] == pytest.approx(float(state.thresholds['layer0']['kernel']))
  assert summary['threshold/layer0/kernel'] == pytest.approx(
    1 / (1 + math.exp(-summary['s/layer0/kernel']))
  )


def test_str_rejects_nonzero_alpha_and_thresholds_start_at_s_init():
  with pytest.raises(ValueError, match='alpha = 0'):
    prunax.STR(alpha=0.5)
  state = prunax.AutoSparse(s_init=-7.0).wrap_optax(optax.sgd(0.1)).init(mlp_params())
  assert float(state.thresholds['layer1']['kernel']) == -7.0
  assert isinstance(state.thresholds['layer1']['bias'], optax.MaskedNode)
  assert hash(prunax.AutoSparse(alpha={'kind': 'cosine', 'decay_steps': 10})) == hash(
    prunax.AutoSparse(alpha=prunax.GradientAnnealing('cosine', decay_steps=10))
  )


# --------------------------------------------------------------------- annealing


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize(
  'kind,formula',
  [
    ('constant', lambda i, t: 1.0),
    ('linear', lambda i, t: 1.0 - i / t),
    ('cosine', lambda i, t: (1 + math.cos(math.pi * i / t)) / 2),
    ('sigmoid', lambda i, t: 1 - _sig(-6 + 12 * i / t)),
    (
      'sigmoid_cosine',
      lambda i, t: max(1 - _sig(-6 + 12 * i / t), (1 + math.cos(math.pi * i / t)) / 2),
    ),
    ('exponential', lambda i, t: math.exp(-0.5 * i)),
  ],
)
def test_annealing_schedules_follow_their_formulas(kind, formula):
  period, periods = 7, 10  # 7 steps per epoch, 10 epochs
  sched = prunax.GradientAnnealing(
    kind, alpha0=0.8, decay_steps=period * periods, steps_per_period=period, beta=0.5
  )
  for step in (0, 1, 6, 7, 20, 34, 35, 52, 69, 70, 100):
    i = min(step // period, periods) if kind != 'exponential' else step // period
    assert float(sched(step)) == pytest.approx(0.8 * formula(i, periods), rel=1e-5, abs=1e-7), step
  # Constant within an epoch; alpha is exactly 0 from zero_at_step on.
  zero = prunax.GradientAnnealing(
    kind, alpha0=0.8, decay_steps=70, steps_per_period=7, zero_at_step=35, beta=0.5
  )
  assert float(zero(34)) == pytest.approx(0.8 * formula(4, periods), rel=1e-5)
  assert float(zero(35)) == 0.0 and float(zero(1000)) == 0.0
  assert float(jax.jit(sched)(jnp.int32(14))) == pytest.approx(float(sched(14)))


def test_annealing_rejects_bad_values():
  with pytest.raises(ValueError, match='kind'):
    prunax.GradientAnnealing('step')
  with pytest.raises(ValueError, match='decay_steps'):
    prunax.GradientAnnealing('cosine')
  with pytest.raises(ValueError, match='alpha0'):
    prunax.GradientAnnealing(alpha0=1.5)


# ------------------------------------------------------------------------ digits


def _digits_mlp(seed=0, sizes=(64, 64, 32, 10)):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  return {
    f'layer{i}': {
      'kernel': jax.random.normal(keys[i], (a, b)) * jnp.sqrt(2.0 / a),
      'bias': jnp.zeros(b),
    }
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def _digits_apply(params, x):
  for i in range(len(params)):
    x = x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias']
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _train_digits(updater, steps=240, batch_size=128):
  digits = load_digits()
  x, y = jnp.asarray(digits.data / 16.0, jnp.float32), jnp.asarray(digits.target)
  tx = updater.wrap_optax(optax.sgd(0.1, momentum=0.9))

  def loss(params, idx):
    logits = _digits_apply(params, x[idx])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

  def step(carry, i):
    params, state = carry
    idx = jax.random.choice(jax.random.PRNGKey(i), x.shape[0], (batch_size,), replace=False)
    updates, state = tx.update(jax.grad(loss)(params, idx), state, params)
    return (optax.apply_updates(params, updates), state), None

  params = _digits_mlp()
  (params, state), _ = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), jnp.arange(steps)))(
    params, tx.init(params)
  )
  accuracy = float(jnp.mean(_digits_apply(params, x).argmax(-1) == y))
  return params, state, accuracy


def test_digits_higher_alpha0_gives_lower_sparsity_and_nonuniform_layers():
  results = {}
  for alpha0 in (0.0, 0.5, 1.0):
    alpha = prunax.GradientAnnealing(
      'sigmoid_cosine', alpha0=alpha0, decay_steps=240, steps_per_period=10
    )
    updater = prunax.AutoSparse(
      alpha=alpha, s_init=-3.0, threshold_lr=0.1, threshold_weight_decay=0.1
    )
    params, _, accuracy = _train_digits(updater)
    results[alpha0] = (prunax.summarize_sparsity(params), accuracy)
    print(alpha0, accuracy, results[alpha0][0])
  totals = [results[a][0]['total_sparsity'] for a in (0.0, 0.5, 1.0)]
  assert totals[0] > totals[1] > totals[2] > 0.5, totals
  assert all(acc > 0.9 for _, acc in results.values())
  layers = [results[0.5][0][f'sparsity/layer{i}/kernel'] for i in range(3)]
  assert max(layers) - min(layers) > 0.1, layers  # learned, non-uniform sparsities


@pytest.mark.parametrize('shape', [(64, 48), (7, 9), (5,)])
def test_split_sum_equals_the_sum(shape):
  from prunax.algorithms import autosparse

  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  mask = rng.random(shape) < 0.3
  got = float(jax.jit(autosparse._split_sum)(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_allclose(got, x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5)

"""AutoSparse, STR and gradient annealing (AutoSparse paper, sections 2-3 and 5)."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import prunax
from prunax.algorithms.autosparse import soft_threshold
from tests.xla_env import compile_as_users

from .helpers import loops_in
from .helpers import loss_fn
from .helpers import make_batch
from .helpers import make_step
from .helpers import mlp_params

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
    algorithm_state=state.algorithm_state._replace(
      dense_params={n: {'kernel': dense[n]['kernel'], 'bias': None} for n in KERNELS},
      thresholds={n: {'kernel': jnp.float32(s[n]), 'bias': None} for n in KERNELS},
    ),
  )
  params = {
    n: {'kernel': soft_threshold(dense[n]['kernel'], s[n]), 'bias': dense[n]['bias']}
    for n in KERNELS
  }
  return tx, state, params


S = {'layer0': -1.2, 'layer1': -1.6}  # thresholds 0.23 and 0.17: both sets non-empty


@pytest.mark.parametrize('own_sgd', [False, True], ids=['inner', 'threshold_lr'])
@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_proxy_and_threshold_gradients_match_reparameterised_forward(alpha, own_sgd):
  dense, batch = mlp_params(), make_batch()
  # The thresholds' step is the inner SGD's (lr 1) by default, or their own SGD's.
  lr, wd = (0.5 if own_sgd else 1.0), 0.01
  updater = prunax.AutoSparse(
    alpha=alpha, threshold_lr=lr if own_sgd else None, threshold_weight_decay=wd
  )
  tx, state, params = _state_at(updater, dense, S)
  assert 0.2 < float(jnp.mean(prunax.bool_masks(state, params)['layer0']['kernel'])) < 0.9
  grads = jax.grad(loss_fn)(params, batch)
  _, new_state = jax.jit(tx.update)(grads, state, params)

  ref_w, ref_s = jax.grad(reparam_loss, argnums=(0, 1))(dense, S, alpha, batch)
  for n in KERNELS:
    np.testing.assert_allclose(
      new_state.algorithm_state.dense_params[n]['kernel'],
      dense[n]['kernel'] - ref_w[n]['kernel'],
      rtol=1e-5,
      atol=1e-6,
    )
    expected_s = S[n] - lr * (ref_s[n] + wd * S[n])
    np.testing.assert_allclose(
      new_state.algorithm_state.thresholds[n]['kernel'], expected_s, rtol=1e-5
    )
    assert abs(float(ref_s[n])) > 1e-4  # the threshold gradient is not trivially zero
  if alpha == 0.0:  # STR: pruned weights receive no gradient.
    pruned = ~prunax.bool_masks(state, params)['layer0']['kernel']
    np.testing.assert_array_equal(
      new_state.algorithm_state.dense_params['layer0']['kernel'][pruned],
      dense['layer0']['kernel'][pruned],
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
      new_state.algorithm_state.dense_params[n]['kernel'],
      w - grads[n]['kernel'] * scale,
      rtol=1e-6,
      atol=1e-7,
    )
    assert int(jnp.sum(active)) < k == int(jnp.sum(in_b))  # A < B < all weights


@pytest.mark.parametrize('leaves', [2, 6])
def test_the_backward_set_of_every_leaf_is_one_selection(leaves):
  # B = TopK(|w|) of every leaf, at every step, by one selection loop, its tie-break
  # included (one per leaf compiled two loops a leaf); its values are checked above.
  dense = mlp_params(sizes=(48,) * (leaves + 1))  # kernels of 2304 weights: searched
  updater = prunax.AutoSparse(alpha=0.5, backward_sparsity=0.5)
  state = prunax.get_sparse_state(updater.wrap_optax(optax.sgd(1.0)).init(dense))
  masks = prunax.bool_masks(state, dense)
  jaxpr = jax.make_jaxpr(lambda d, st: updater._proxy_scale(d, masks, st))(dense, state)
  assert loops_in(jaxpr.jaxpr) == 1


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
    d = np.asarray(state.algorithm_state.dense_params[n]['kernel'])
    t = 1.0 / (1.0 + np.exp(-float(state.algorithm_state.thresholds[n]['kernel'])))
    np.testing.assert_allclose(
      params[n]['kernel'], np.sign(d) * np.maximum(np.abs(d) - t, 0.0), atol=1e-6
    )
    np.testing.assert_array_equal(prunax.bool_masks(state, params)[n]['kernel'], np.abs(d) > t)
    np.testing.assert_array_equal(params[n]['kernel'] != 0, np.abs(d) > t)
  summary = prunax.summarize_thresholds(state)
  assert summary['s/layer0/kernel'] == pytest.approx(
    float(state.algorithm_state.thresholds['layer0']['kernel'])
  )
  assert summary['threshold/layer0/kernel'] == pytest.approx(
    1 / (1 + math.exp(-summary['s/layer0/kernel']))
  )


def test_str_rejects_nonzero_alpha_and_thresholds_start_at_s_init():
  with pytest.raises(ValueError, match='alpha = 0'):
    prunax.STR(alpha=0.5)
  state = prunax.AutoSparse(s_init=-7.0).wrap_optax(optax.sgd(0.1)).init(mlp_params())
  assert float(state.algorithm_state.thresholds['layer1']['kernel']) == -7.0
  assert isinstance(state.algorithm_state.thresholds['layer1']['bias'], optax.MaskedNode)
  assert hash(prunax.AutoSparse(alpha={'kind': 'cosine', 'decay_steps': 10})) == hash(
    prunax.AutoSparse(alpha=prunax.GradientAnnealing('cosine', decay_steps=10))
  )


# ------------------------------------------------- thresholds in the weights' optimizer


def _by_hand_threshold_grad(w, g, s, alpha, wd, first=False):
  """dL/ds + wd * s transcribed: -sigmoid'(s) * sum(g * sign(w) * (1 on A, alpha off A)).

  A is ``|w| > sigmoid(s)``; on the first step every weight (the model saw the params as
  initialised, all active).
  """
  t = 1.0 / (1.0 + np.exp(-s))
  c = np.where((np.abs(w) > t) | first, 1.0, alpha)
  return -t * (1.0 - t) * np.sum(g * np.sign(w) * c) + wd * s


W = np.array([[0.9, -0.1, 0.4], [-0.6, 0.05, -0.3]], np.float32)
G1 = np.array([[0.2, -0.5, 0.1], [0.3, 0.7, -0.2]], np.float32)
G2 = np.array([[-0.4, 0.1, 0.6], [0.2, -0.3, 0.5]], np.float32)


def _two_steps(inner, **kwargs):
  """Two updates of a one-leaf model from fixed gradients; the states after each."""
  updater = prunax.AutoSparse(s_init=-1.0, **kwargs)
  tx = updater.wrap_optax(inner)
  params = {'w': jnp.asarray(W)}
  state = tx.init(params)
  states = []
  for g in (G1, G2):
    updates, state = jax.jit(tx.update)({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    states.append(state)
  return states


def test_thresholds_take_the_inner_adams_steps():
  lr, b1, b2, eps, wd, alpha = 0.01, 0.9, 0.999, 1e-8, 0.1, 0.5
  s1_state, s2_state = _two_steps(
    optax.adam(lr, b1, b2, eps), alpha=alpha, threshold_weight_decay=wd
  )
  # Adam transcribed (bias-corrected moments; Kingma & Ba, algorithm 1). The threshold of
  # step 2 is computed from the dense weights after step 1, which Adam moved as well.
  s0 = -1.0
  d1 = _by_hand_threshold_grad(W, G1, s0, alpha, wd, first=True)
  m, v = (1 - b1) * d1, (1 - b2) * d1**2
  s1 = s0 - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
  assert abs(s1 - s0) == pytest.approx(lr, abs=1e-7)  # Adam's first step: lr, whatever |d1|
  np.testing.assert_allclose(float(s1_state.algorithm_state.thresholds['w']), s1, rtol=1e-6)
  # The dense weights after step 1, from the same Adam.
  w1 = W - lr * G1 / (np.abs(G1) + eps)
  np.testing.assert_allclose(s1_state.algorithm_state.dense_params['w'], w1, rtol=1e-6, atol=1e-7)
  d2 = _by_hand_threshold_grad(w1, G2, s1, alpha, wd)
  m, v = b1 * m + (1 - b1) * d2, b2 * v + (1 - b2) * d2**2
  s2 = s1 - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
  np.testing.assert_allclose(float(s2_state.algorithm_state.thresholds['w']), s2, rtol=1e-6)
  # The thresholds' moments are in the optimizer state, beside the weights' own.
  adam_state = s2_state.algorithm_state.threshold_state[0]
  assert int(adam_state.count) == 2 == int(s2_state.inner_state[0].count)
  np.testing.assert_allclose(float(adam_state.mu['w']), m, rtol=1e-6)
  np.testing.assert_allclose(float(adam_state.nu['w']), v, rtol=1e-6)


def test_thresholds_follow_the_inner_sgd_momentum_and_its_schedule():
  # torch.optim.SGD (STR's optimizer) transcribed: d = grad + st_decay * s; buf = d on the
  # first step, then momentum * buf + d; s -= lr_t * buf, lr_t from the weights' schedule.
  lrs, mu, wd, alpha = (0.3, 0.1), 0.875, 0.05, 0.75
  schedule = optax.piecewise_constant_schedule(lrs[0], {1: lrs[1] / lrs[0]})
  s1_state, s2_state = _two_steps(
    optax.sgd(schedule, momentum=mu), alpha=alpha, threshold_weight_decay=wd
  )
  s0 = -1.0
  buf = _by_hand_threshold_grad(W, G1, s0, alpha, wd, first=True)
  s1 = s0 - lrs[0] * buf
  np.testing.assert_allclose(float(s1_state.algorithm_state.thresholds['w']), s1, rtol=1e-6)
  w1 = np.asarray(s1_state.algorithm_state.dense_params['w'])
  buf = mu * buf + _by_hand_threshold_grad(w1, G2, s1, alpha, wd)
  np.testing.assert_allclose(
    float(s2_state.algorithm_state.thresholds['w']), s1 - lrs[1] * buf, rtol=1e-6
  )


def test_own_sgd_keeps_the_old_update():
  # threshold_lr: plain SGD on the thresholds, no optimizer state for them (as before).
  lr, wd, alpha = 0.2, 0.05, 0.75
  s1_state, s2_state = _two_steps(
    optax.adam(0.01), alpha=alpha, threshold_lr=lr, threshold_weight_decay=wd
  )
  assert isinstance(s2_state.algorithm_state.threshold_state, optax.MaskedNode)
  s1 = -1.0 - lr * _by_hand_threshold_grad(W, G1, -1.0, alpha, wd, first=True)
  np.testing.assert_allclose(float(s1_state.algorithm_state.thresholds['w']), s1, rtol=1e-6)
  w1 = np.asarray(s1_state.algorithm_state.dense_params['w'])
  s2 = s1 - lr * _by_hand_threshold_grad(w1, G2, s1, alpha, wd)
  np.testing.assert_allclose(float(s2_state.algorithm_state.thresholds['w']), s2, rtol=1e-6)


def test_thresholds_follow_their_leafs_transformation():
  # multi_transform labels the thresholds as their leaves: a frozen leaf's threshold stays.
  params = mlp_params()
  labels = {'layer0': {'kernel': 'frozen', 'bias': 'train'}, 'layer1': 'train'}
  inner = optax.multi_transform({'train': optax.adam(0.1), 'frozen': optax.set_to_zero()}, labels)
  tx = prunax.AutoSparse(s_init=-2.0).wrap_optax(inner)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, make_batch())
  _, state = jax.jit(tx.update)(grads, state, params)
  assert float(state.algorithm_state.thresholds['layer0']['kernel']) == -2.0
  # Adam's first step is +-lr.
  assert abs(float(state.algorithm_state.thresholds['layer1']['kernel']) + 2.0) == pytest.approx(
    0.1, rel=1e-4
  )


def _labels_by_rank(tree):
  return jax.tree.map(lambda x: 'decay' if jnp.ndim(x) else 'none', tree)


@pytest.mark.parametrize(
  'inner, adams_lr',
  [
    (optax.adam(0.1), 0.1),
    (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)), 0.1),
    (
      optax.multi_transform({'decay': optax.adamw(0.1), 'none': optax.adam(0.2)}, _labels_by_rank),
      0.2,
    ),
    (
      optax.chain(optax.masked(optax.add_decayed_weights(0.1), _labels_by_rank), optax.sgd(0.1)),
      None,
    ),
  ],
  ids=['adam', 'clip', 'multi_transform_by_rank', 'masked_by_rank'],
)
def test_the_thresholds_optimizer_holds_state_only_for_pruned_leaves(inner, adams_lr):
  # The thresholds' tree is the params' with MaskedNode() at the biases (not pruned): the
  # wrapped optimizer keeps no state for them (a 0-d zero there cost every unpruned leaf
  # an optimizer state and its kernels), and labels and masks by tree still apply.
  params = mlp_params()
  tx = prunax.AutoSparse(s_init=-2.0).wrap_optax(inner)
  grads = jax.grad(loss_fn)(params, make_batch())
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  algorithm = state.algorithm_state
  kernels_only = {k: {'kernel': jnp.float32(0)} for k in params}
  assert len(jax.tree.leaves(algorithm.threshold_state)) == len(
    jax.tree.leaves(inner.init(kernels_only))
  )
  moved = [float(v['kernel']) + 2.0 for v in algorithm.thresholds.values()]
  assert len(moved) == 2 and all(np.isfinite(moved)) and all(m != 0 for m in moved), moved
  if adams_lr is not None:  # Adam's first step is +-lr (0-d thresholds: labelled 'none').
    np.testing.assert_allclose(np.abs(moved), adams_lr, rtol=1e-4)


def test_autosparse_with_no_pruned_leaf_trains_the_rest():
  params = {'bias': jnp.ones(4)}
  tx = prunax.AutoSparse().wrap_optax(optax.adam(0.01))
  updates, state = jax.jit(tx.update)(params, tx.init(params), params)
  np.testing.assert_allclose(updates['bias'], -0.01, rtol=1e-4)
  assert len(jax.tree.leaves(state.algorithm_state.threshold_state)) == 1  # adam's count


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


def test_default_alpha_is_the_papers_sigmoid_cosine_decay():
  # Section 5.1: Sigmoid-Cosine decay (eq. 4) of alpha0 = 0.75 over the training (T steps).
  steps = 200
  updater = prunax.AutoSparse(training_steps=steps)
  for step in (0, 1, 50, 100, 150, 190, 199, 200, 400):
    x = min(step / steps, 1.0)
    cosine = (1 + math.cos(math.pi * x)) / 2
    sigmoid = 1 - _sig(-6 + 12 * x)
    expected = 0.75 * max(sigmoid, cosine)
    assert float(updater.alpha_schedule()(step)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
  # The update reads it: a pruned weight's gradient is scaled by alpha at the state's step.
  params = {'w': jnp.asarray(W)}
  tx = dataclasses.replace(updater, s_init=-1.0).wrap_optax(optax.sgd(1.0))
  # A step with zero gradients sets the masks (|w| > sigmoid(-1)), then step 150.
  updates, state = tx.update({'w': jnp.zeros_like(params['w'])}, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  _, state = tx.update({'w': jnp.asarray(G1)}, state._replace(count=jnp.int32(150)), params)
  alpha = 0.75 * max(1 - _sig(-6 + 12 * 0.75), (1 + math.cos(math.pi * 0.75)) / 2)
  pruned = np.abs(W) <= _sig(-1.0)
  assert 0 < pruned.sum() < pruned.size
  np.testing.assert_allclose(
    state.algorithm_state.dense_params['w'], W - G1 * np.where(pruned, alpha, 1.0), rtol=1e-6
  )
  # Without the length of training, the paper's fixed scale; STR stays at 0.
  assert float(prunax.AutoSparse().alpha_schedule()(10**6)) == 0.75
  assert float(prunax.STR(training_steps=steps).alpha_schedule()(0)) == 0.0


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
    # Thresholds trained by the weights' SGD (lr 0.1, momentum 0.9).
    updater = prunax.AutoSparse(alpha=alpha, s_init=-3.0, threshold_weight_decay=0.03)
    params, _, accuracy = _train_digits(updater)
    results[alpha0] = (prunax.summarize_sparsity(params), accuracy)
    print(alpha0, accuracy, results[alpha0][0])
  totals = [results[a][0]['total_sparsity'] for a in (0.0, 0.5, 1.0)]
  assert totals[0] > totals[1] > totals[2] > 0.5, totals
  assert all(acc > 0.9 for _, acc in results.values())
  layers = [results[0.5][0][f'sparsity/layer{i}/kernel'] for i in range(3)]
  assert max(layers) - min(layers) > 0.1, layers  # learned, non-uniform sparsities


def test_stacked_leaves_of_different_ranks():
  # Per-layer thresholds of stacked leaves have shapes (L, 1, 1, 1) and (L, 1, 1): the step
  # once broadcast them against each other (an (L, L, 1, 1) "zero" added to the gradients).
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {
    'a': jax.random.normal(keys[0], (2, 8, 4, 4)),
    'b': jax.random.normal(keys[1], (2, 8, 16)),
  }
  pruner = prunax.AutoSparse(layer_axes={'a': 0, 'b': 0})
  tx = pruner.wrap_optax(optax.adam(1e-2))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


def _optimised_step(layers: int) -> str:
  """The optimised HLO of an AutoSparse + Adam step of an MLP of ``layers`` 32 x 32 layers."""
  params = mlp_params(sizes=(32,) * (layers + 1))
  tx = prunax.AutoSparse().wrap_optax(optax.adam(1e-3))
  batch = (jnp.zeros((4, 32)), jnp.zeros((4, 32)))
  step = jax.jit(make_step(tx)).lower(params, tx.init(params), batch)
  return compile_as_users(step).as_text()


def test_no_fusion_of_the_step_grows_with_the_layers():
  # The thresholds' all-finite flag read every leaf's threshold gradient in one fusion
  # (13 instructions a leaf), which XLA's fusion pass builds in time quadratic in the
  # leaves: 892 ms of the compile of 256 layers (dense: 77 ms for the whole pass), 443 ms
  # with the gradients concatenated first (XLA fuses nothing into a concatenation of
  # more than 8 operands, and the flag reads the vector).
  def largest_fusion(layers):
    text = _optimised_step(layers)
    bodies = re.findall(r'^%fused_computation[^\n]*\{\n(.*?)\n\}', text, re.S | re.M)
    return max(b.count('\n') + 1 for b in bodies)

  assert largest_fusion(24) == largest_fusion(12), (largest_fusion(12), largest_fusion(24))


def test_step_compiles_linearly_in_the_layers():
  # The thresholds' all-finite flag is computed once (_xla_workarounds.shared_flag): fused
  # into every leaf's update it made the optimised step quadratic in the layers (3345,
  # 8321, 24513 lines at 4, 8, 16 layers; 64 layers compiled in 31 s, 48x dense).
  def lines(layers):
    return _optimised_step(layers).count('\n')

  small, medium, large = lines(4), lines(8), lines(16)
  assert large - medium <= 2.5 * (medium - small), (small, medium, large)

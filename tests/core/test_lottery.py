"""Lottery tickets: iterative magnitude pruning with rewinding, on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import prunax
from prunax import lottery

SIZES = (64, 125, 10)  # 8000 + 1250 weights: 0.8**3 of each is a whole number


def _init(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES))
  return {
    f'layer{i}': {
      'kernel': jax.random.normal(keys[i], (a, b)) * jnp.sqrt(2.0 / a),
      'bias': jnp.zeros(b),
    }
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
  }


def _apply(params, x):
  h = jax.nn.relu(x @ params['layer0']['kernel'] + params['layer0']['bias'])
  return h @ params['layer1']['kernel'] + params['layer1']['bias']


def _make_train_fn(steps=40, calls=None, saved=None):
  digits = load_digits()
  x, y = jnp.asarray(digits.data / 16.0, jnp.float32), jnp.asarray(digits.target)

  def loss(params, idx):
    return optax.softmax_cross_entropy_with_integer_labels(_apply(params, x[idx]), y[idx]).mean()

  def train_fn(params, updater, save_step):
    calls.append((params, updater, save_step))
    tx = updater.wrap_optax(optax.sgd(0.1, momentum=0.9))

    def step(carry, i):
      p, s = carry
      idx = jax.random.choice(jax.random.PRNGKey(i), x.shape[0], (64,), replace=False)
      u, s = tx.update(jax.grad(loss)(p, idx), s, p)
      return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(carry, start, stop):
      return jax.lax.fori_loop(start, stop, lambda i, c: step(c, i)[0], carry)

    carry = (params, tx.init(params))
    if save_step:
      carry = run(carry, 0, save_step)
      if saved is not None:
        saved.append(carry[0])
    params, _ = run(carry, save_step or 0, steps)
    accuracy = float(jnp.mean(_apply(params, x).argmax(-1) == y))
    return params, {'accuracy': accuracy}, carry[0] if save_step else None

  return train_fn


@pytest.mark.parametrize('distribution', [None, 'uniform'])
def test_three_rounds_at_20_percent_with_late_rewinding(distribution):
  calls, saved = [], []
  history = lottery.iterative_magnitude_pruning(
    _make_train_fn(calls=calls, saved=saved),
    _init(),
    rounds=3,
    prune_fraction=0.2,
    rewind_step=5,
    sparsity_distribution_fn=distribution,
  )
  assert [h.round for h in history] == [0, 1, 2, 3]
  assert isinstance(calls[0][1], prunax.NoPruning) and calls[0][2] == 5
  for h in history:
    print(h.round, h.metrics, h.sparsity['total_sparsity'])
    assert h.metrics['accuracy'] > 0.8
  # Exactly 1 - 0.8^3 of the pruned leaves' weights are zero: 61/125 of 9250.
  assert history[3].sparsity['total_nonzero'] == 9250 * 64 // 125
  if distribution == 'uniform':
    assert history[3].sparsity['sparsity/layer0/kernel'] == pytest.approx(61 / 125, abs=1e-12)
    assert history[3].sparsity['sparsity/layer1/kernel'] == pytest.approx(61 / 125, abs=1e-12)
  # Rewinding restores exactly the weights saved after 5 steps of round 0.
  saved = saved[0]
  for r in (1, 2, 3):
    h = history[r]
    assert calls[r][0] is h.start_params
    assert isinstance(calls[r][1], prunax.pruning_at_init.FixedMaskSparse)
    for name in ('layer0', 'layer1'):
      m = np.asarray(h.masks[name]['kernel'])
      start = np.asarray(h.start_params[name]['kernel'])
      np.testing.assert_array_equal(start[m], np.asarray(saved[name]['kernel'])[m])
      assert np.all(start[~m] == 0)
      assert np.all(np.asarray(h.trained_params[name]['kernel'])[~m] == 0)
      np.testing.assert_array_equal(h.start_params[name]['bias'], saved[name]['bias'])
      if r > 1:  # pruned weights stay pruned
        assert not np.any(m & ~np.asarray(history[r - 1].masks[name]['kernel']))


def test_rewind_to_init_and_bad_values():
  calls = []
  init = _init()
  history = lottery.iterative_magnitude_pruning(
    _make_train_fn(steps=20, calls=calls), init, rounds=1, prune_fraction=0.5
  )
  assert calls[0][2] is None
  m = np.asarray(history[1].masks['layer0']['kernel'])
  np.testing.assert_array_equal(
    np.asarray(history[1].start_params['layer0']['kernel'])[m],
    np.asarray(init['layer0']['kernel'])[m],
  )
  assert history[1].sparsity['total_sparsity'] == pytest.approx(0.5)
  with pytest.raises(ValueError, match='prune_fraction'):
    lottery.iterative_magnitude_pruning(_make_train_fn(calls=[]), init, 1, prune_fraction=1.0)

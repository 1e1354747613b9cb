"""Pruning at initialisation: SNIP, GraSP, SynFlow, and static training on their masks."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import pruning_at_init as pai
from tests.core.helpers import xla_compiles
from tests.core.test_selection import reference_masks
from tests.core.test_sparsity_types import expected_zeros

# A 2-layer linear model y = x W1 W2 with loss 0.5 * sum((y - t)^2): its gradient and
# Hessian-gradient product have closed forms.
X = np.random.RandomState(0).randn(5, 4).astype(np.float32)
T = np.random.RandomState(1).randn(5, 3).astype(np.float32)
PARAMS = {
  'w1': jnp.asarray(np.random.RandomState(2).randn(4, 6), jnp.float32) * 0.5,
  'w2': jnp.asarray(np.random.RandomState(3).randn(6, 3), jnp.float32) * 0.5,
}


def linear_apply(params, x):
  return x @ params['w1'] @ params['w2']


def linear_loss(params, batch):
  x, t = batch
  return 0.5 * jnp.sum((linear_apply(params, x) - t) ** 2)


def _hand_grads(w1, w2, x, t):
  r = x @ w1 @ w2 - t
  return x.T @ r @ w2.T, (x @ w1).T @ r, r


def test_snip_and_grasp_scores_match_hand_computation():
  w1, w2 = np.asarray(PARAMS['w1'], np.float64), np.asarray(PARAMS['w2'], np.float64)
  g1, g2, r = _hand_grads(w1, w2, X, T)
  snip = pai.snip_scores(linear_loss, PARAMS, (X, T))
  np.testing.assert_allclose(snip['w1'], np.abs(g1 * w1), rtol=1e-4)
  np.testing.assert_allclose(snip['w2'], np.abs(g2 * w2), rtol=1e-4)
  # Hessian times g: the derivative of the gradient along (g1, g2).
  dr = X @ g1 @ w2 + X @ w1 @ g2
  hg1 = X.T @ dr @ w2.T + X.T @ r @ g2.T
  hg2 = (X @ g1).T @ r + (X @ w1).T @ dr
  grasp = pai.grasp_scores(linear_loss, PARAMS, (X, T))
  np.testing.assert_allclose(grasp['w1'], -w1 * hg1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grasp['w2'], -w2 * hg2, rtol=1e-4, atol=1e-5)

  # Global masks: exactly the top half of all scores kept (SNIP), the bottom half (GraSP).
  for fn, scores, sign in ((pai.snip, snip, 1.0), (pai.grasp, grasp, -1.0)):
    masks = fn(linear_loss, PARAMS, (X, T), 0.5)
    flat = np.concatenate([sign * np.asarray(scores[k]).ravel() for k in ('w1', 'w2')])
    kept = np.concatenate([np.asarray(masks[k]).ravel() for k in ('w1', 'w2')])
    assert kept.sum() == flat.size // 2
    assert flat[kept].min() >= flat[~kept].max()


def test_synflow_scores_match_hand_computation():
  a1, a2 = np.abs(np.asarray(PARAMS['w1'])), np.abs(np.asarray(PARAMS['w2']))
  scores = pai.synflow_scores(linear_apply, PARAMS, (1, 4))
  # R = 1^T |W1| |W2| 1:  dR/dW1_ij = sum_k |W2|_jk,  dR/dW2_jk = sum_i |W1|_ij.
  np.testing.assert_allclose(scores['w1'], a1 * a2.sum(1)[None, :], rtol=1e-5)
  np.testing.assert_allclose(scores['w2'], a2 * a1.sum(0)[:, None], rtol=1e-5)
  # Already-pruned weights contribute nothing to the flow.
  masks = {'w1': jnp.ones((4, 6), bool).at[:, 0].set(False), 'w2': jnp.ones((6, 3), bool)}
  masked = pai.synflow_scores(linear_apply, PARAMS, (1, 4), masks)
  np.testing.assert_allclose(masked['w2'][0], 0.0)
  np.testing.assert_allclose(masked['w1'][:, 1:], scores['w1'][:, 1:], rtol=1e-5)


SIZES = (64, 64, 64, 64, 64, 64, 10)


def _deep_mlp(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES))
  return {
    f'layer{i}': {
      'kernel': jax.random.normal(keys[i], (a, b)) * jnp.sqrt(2.0 / a),
      'bias': jnp.zeros(b),
    }
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
  }


def _deep_apply(params, x):
  for i in range(len(params)):
    x = x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias']
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _kept_and_connected(masks):
  kept = [int(np.sum(masks[f'layer{i}']['kernel'])) for i in range(len(SIZES) - 1)]
  reach = np.ones(SIZES[0], bool)  # input units reachable through kept weights
  for i in range(len(SIZES) - 1):
    reach = (reach.astype(np.int64) @ np.asarray(masks[f'layer{i}']['kernel'], np.int64)) > 0
  return kept, bool(reach.any())


def test_synflow_avoids_layer_collapse_at_99_percent():
  params = _deep_mlp()
  batch = (jax.random.normal(jax.random.PRNGKey(5), (64, 64)), jnp.arange(64) % 10)
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
    _deep_apply(p, b[0]), b[1]
  ).mean()
  total = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
  flow = pai.synflow(_deep_apply, params, (1, 64), 0.99, iterations=20)
  snip = pai.snip(loss, params, batch, 0.99)
  flow_kept, flow_connected = _kept_and_connected(flow)
  snip_kept, snip_connected = _kept_and_connected(snip)
  print('synflow kept per layer', flow_kept, 'connected', flow_connected)
  print('snip kept per layer', snip_kept, 'connected', snip_connected)
  assert sum(flow_kept) == total - round(0.99 * total) == sum(snip_kept)
  assert min(flow_kept) > 0 and flow_connected


def test_static_training_from_pai_masks():
  batch = (X, T)
  masks = pai.snip(linear_loss, PARAMS, batch, 0.6)
  via_config = prunax.create_updater_from_config(
    {'algorithm': 'snip', 'sparsity': 0.6, 'extra': {'loss_fn': linear_loss, 'batch': batch}}
  )
  fixed = pai.FixedMaskSparse(masks=masks)
  assert hash(fixed) == hash(pai.FixedMaskSparse(masks=jax.tree.map(np.asarray, masks)))
  for updater in (via_config, fixed):
    tx = updater.wrap_optax(optax.adam(0.05))
    params, state = PARAMS, tx.init(PARAMS)
    step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(linear_loss)(p, batch), s, p))
    for _ in range(5):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    for k in ('w1', 'w2'):
      np.testing.assert_array_equal(np.asarray(params[k]) != 0, masks[k])
      np.testing.assert_array_equal(prunax.bool_masks(state, params)[k], masks[k])
  synflow = prunax.create_updater_from_config(
    {
      'algorithm': 'synflow',
      'sparsity': 0.5,
      'extra': {'apply_fn': linear_apply, 'input_shape': (1, 4), 'iterations': 3},
    }
  )
  _, flow_masks = synflow.instant_sparsify(PARAMS)
  expected = pai.synflow(linear_apply, PARAMS, (1, 4), 0.5, iterations=3)
  for k in ('w1', 'w2'):
    np.testing.assert_array_equal(flow_masks[k], expected[k])
  with pytest.raises(ValueError, match='loss_fn and batch'):
    prunax.create_updater_from_config({'algorithm': 'grasp', 'sparsity': 0.5})


def test_fixed_masks_saved_as_dicts_fit_params_in_a_frozen_dict():
  """Masks loaded from a file are plain dicts; t5x holds params in a FrozenDict."""
  from flax.core import FrozenDict

  params = FrozenDict({'dense': {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}})
  keep = np.arange(16).reshape(4, 4) % 4 == 0
  tx = pai.FixedMaskSparse(masks={'dense': {'kernel': keep, 'bias': None}}).wrap_optax(
    optax.sgd(0.1)
  )
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new['dense']['kernel']) != 0, keep)
  assert (np.asarray(new['dense']['bias']) == 0.9).all()
  with pytest.raises(ValueError, match=r"no mask for \['dense/kernel'\]"):
    pai.FixedMaskSparse(masks={'dense': {'w': keep, 'bias': None}}).wrap_optax(optax.sgd(0.1)).init(
      params
    )


def _tied_scores(seed: int) -> tuple[dict, dict]:
  # Params of shapes no other test uses (a cold compile cache), scores of few values
  # (ties across and within leaves), a bias left dense by the default filter.
  rng = np.random.default_rng(seed)
  params = {
    'a': jnp.asarray(rng.standard_normal((37, 29)), jnp.float32),
    'b': jnp.asarray(rng.standard_normal((29, 53)), jnp.float32),
    'bias': jnp.zeros(53),
  }
  scores = jax.tree.map(lambda p: jnp.asarray(rng.integers(0, 7, p.shape), jnp.float32), params)
  return params, scores


def _reference_masks(scores, sparsity, distribution):
  # Stable-sort reference: the k largest scores, ties by lowest flat position (over the
  # pruned leaves in order for one global threshold); k = size - round(sparsity * size) in
  # float32, at least one weight kept.
  def kept(size):
    return size - expected_zeros(sparsity, size)

  pruned = [np.asarray(scores[n]) for n in ('a', 'b')]
  if distribution is None:
    masks = reference_masks(pruned, kept(sum(x.size for x in pruned)))
  else:
    masks = [reference_masks([x], kept(x.size))[0] for x in pruned]
  return dict(zip(('a', 'b'), masks, strict=True))


@pytest.mark.parametrize('distribution', [None, 'uniform'])
def test_masks_from_scores_compile_once_for_every_sparsity(distribution):
  # One program serves every sparsity (an IMP round, SNIP at another target): run eagerly,
  # the selection compiled each of its operations (the benchmark transformer LM's masks
  # took 16 s, then 2.5 s at the next sparsity; 5 s, then 0.08 s, jitted).
  params, scores = _tied_scores(0)
  with xla_compiles() as compiles:
    for sparsity in (0.3, 0.77, 0.0, 0.95):
      masks = pai.masks_from_scores(params, scores, sparsity, distribution)
      assert masks['bias'] is None
      want = _reference_masks(scores, sparsity, distribution)
      for name in ('a', 'b'):
        np.testing.assert_array_equal(np.asarray(masks[name]), want[name], err_msg=name)
  assert len(compiles) <= 1, len(compiles)  # none if an earlier test compiled it


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
  st.integers(0, 2**31 - 1),
  st.floats(0.0, 0.999, allow_nan=False),
  st.sampled_from([None, 'uniform']),
)
def test_masks_from_scores_keep_the_k_largest_at_any_sparsity(seed, sparsity, distribution):
  params, scores = _tied_scores(seed)
  masks = pai.masks_from_scores(params, scores, sparsity, distribution)
  want = _reference_masks(scores, sparsity, distribution)
  for name in ('a', 'b'):
    np.testing.assert_array_equal(np.asarray(masks[name]), want[name], err_msg=name)

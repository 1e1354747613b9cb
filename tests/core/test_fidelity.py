"""Fidelity to the papers' reference code (issue 22): each test checks a rule against the
reference's formula, or a transcription of its code, on numbers of its own."""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import flops
from prunax import pruning_at_init
from prunax import sparsity_schedules as sched
from prunax import sparsity_types
from tests.core.helpers import mlp_params

# ------------------------------------------------------------------ RigL / SET drop rule


def _rigl_reference_masks(mask, w, g, drop_fraction):
  """Transcription of rigl's SparseRigLOptimizer._get_update_op (numpy, one tensor).

  n_prune = int(float(n_ones) * drop_fraction) (a cast: floor); keep the n_ones - n_prune
  largest |w| (masked), then grow n_prune among the rest by largest |g|.
  """
  mask = np.asarray(mask).reshape(-1).astype(bool)
  n_ones = int(mask.sum())
  n_prune = int(np.float32(n_ones) * np.float32(drop_fraction))
  n_keep = n_ones - n_prune
  drop_score = np.where(mask, np.abs(np.asarray(w).reshape(-1)), -np.inf)
  order = np.argsort(-drop_score, kind='stable')
  kept = np.zeros_like(mask)
  kept[order[:n_keep]] = True
  grow_score = np.where(kept, -np.inf, np.abs(np.asarray(g).reshape(-1)))
  order = np.argsort(-grow_score, kind='stable')
  grown = np.zeros_like(mask)
  grown[order[:n_prune]] = True
  return (kept | grown).reshape(np.shape(w)), n_prune


def test_rigl_drops_floor_of_fraction_times_active():
  # 10 active weights, drop fraction 0.25: the reference drops int(2.5) = 2, round gives 2
  # too (half to even); 0.35 -> int(3.5) = 3 but round(3.5) = 4: the rules differ.
  w = jnp.asarray(np.linspace(1.0, 2.0, 16, dtype=np.float32).reshape(4, 4))
  w = w.at[0, :].set(0.0).at[1, :2].set(0.0)  # 6 inactive (zero), 10 active
  g = jnp.asarray(np.arange(16, dtype=np.float32)[::-1].reshape(4, 4))
  mask = w != 0
  rigl = prunax.RigL(sparsity=6 / 16, drop_fraction=0.35, drop_fraction_fn='constant')
  state = rigl.wrap_optax(optax.sgd(0.0)).init({'w': w})
  state = state._replace(masks=rigl.store_masks({'w': mask}))
  new = rigl.compute_masks(
    {'w': w}, {'w': 6 / 16}, sparse_state=state, grads={'w': g}, old_masks={'w': mask}
  )['w']
  want, n_prune = _rigl_reference_masks(mask, w, g, 0.35)
  assert n_prune == 3
  np.testing.assert_array_equal(np.asarray(new), want)
  # Exactly 3 weights moved: the 3 smallest active weights dropped, 3 grown.
  assert int(np.sum(np.asarray(new) & ~np.asarray(mask))) == 3


def test_cosine_drop_fraction_needs_an_end_step():
  with pytest.raises(ValueError, match='update_end_step.*drop_fraction_fn="constant"'):
    prunax.RigL(
      sparsity=0.5, drop_fraction_fn='cosine', scheduler=sched.PeriodicSchedule(update_freq=10)
    )
  # The default: cosine when the schedule ends, as the paper (rigl's cosine_decay to 0).
  rigl = prunax.RigL(
    sparsity=0.5, drop_fraction=0.3, scheduler=sched.PeriodicSchedule(10, 0, update_end_step=100)
  )
  assert rigl.drop_fraction_fn == 'cosine'
  for step in (0, 25, 50, 100, 150):
    want = 0.3 * 0.5 * (1 + math.cos(math.pi * min(step, 100) / 100))
    assert float(rigl.drop_fraction_at(step)) == pytest.approx(want, abs=1e-7)
  # Without an end step the default is constant, and it says so.
  with pytest.warns(UserWarning, match='no update_end_step'):
    rigl = prunax.RigL(sparsity=0.5, scheduler=sched.PeriodicSchedule(update_freq=10))
  assert rigl.drop_fraction_fn == 'constant'
  assert float(rigl.drop_fraction_at(10**6)) == pytest.approx(0.3)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    prunax.SET(sparsity=0.5, drop_fraction_fn='constant')


def test_configs_get_cosine_from_update_end_step():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    rigl = prunax.create_updater_from_config(
      {'algorithm': 'rigl', 'sparsity': 0.8, 'update_freq': 5, 'update_end_step': 50}
    )
  assert rigl.drop_fraction_fn == 'cosine'
  assert float(rigl.drop_fraction_at(50)) == pytest.approx(0.0, abs=1e-8)
  with pytest.raises(ValueError, match='update_end_step'):
    prunax.create_updater_from_config(
      {'algorithm': 'set', 'sparsity': 0.8, 'drop_fraction_fn': 'cosine'}
    )


# --------------------------------------------------------------- at least one weight kept


@pytest.mark.parametrize('sparsity,size', [(0.9, 4), (0.99, 10), (0.95, 7), (0.5, 1)])
def test_every_pruned_leaf_keeps_a_weight(sparsity, size):
  # round(s * n) would remove all n weights (s * n >= n - 0.5).
  assert round(sparsity * size) >= size - 0.5 or size == 1
  assert int(sparsity_types.num_zeros(sparsity, size)) == size - 1
  assert int(jax.jit(sparsity_types.num_zeros, static_argnums=1)(sparsity, size)) == size - 1
  scores = jnp.arange(size, dtype=jnp.float32)
  mask = np.asarray(prunax.Unstructured().mask(scores, sparsity))
  assert mask.sum() == 1 and mask[-1]
  params = {'w': jnp.ones((size, 1)) * jnp.arange(1.0, size + 1)[:, None]}
  _, masks = prunax.MagnitudePruning(sparsity=sparsity).instant_sparsify(params)
  assert int(masks['w'].sum()) == 1


def test_channel_and_block_keep_one_group():
  scores = jnp.arange(12.0).reshape(3, 4)
  keep = np.asarray(prunax.Channel(axis=-1).mask(scores, 0.9))  # 4 channels, round(3.6) = 4
  assert keep.all(0).sum() == 1
  keep = np.asarray(prunax.Block((3, 2)).mask(scores, 0.8))  # 2 blocks, round(1.6) = 2
  assert keep.sum() == 6


# ------------------------------------------------------------------------- N:M axis


def test_nm_groups_run_along_the_input_axis_by_default():
  # Flax Dense kernel (in=8, out=3): groups of 4 along the 8 inputs of each output.
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
  mask = np.asarray(prunax.NByM(2, 4).mask(scores, 0.5))
  for out in range(3):
    for group in range(2):
      col = np.asarray(scores)[4 * group : 4 * group + 4, out]
      want = np.zeros(4, bool)
      want[np.argsort(-col, kind='stable')[:2]] = True
      np.testing.assert_array_equal(mask[4 * group : 4 * group + 4, out], want)
  # Conv kernel (h, w, in, out): the input-channel axis.
  conv = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 5)), jnp.float32)
  mask = np.asarray(prunax.NByM(2, 4).mask(conv, 0.5))
  assert (np.moveaxis(mask, 2, -1).reshape(-1, 4).sum(-1) == 2).all()
  # 1-D leaves: the only axis; an explicit axis is kept.
  assert (np.asarray(prunax.NByM(1, 4).mask(jnp.arange(8.0), 0.5)).reshape(2, 4).sum(-1) == 1).all()
  mask = np.asarray(prunax.NByM(2, 4, axis=-1).mask(jnp.ones((3, 8)), 0.5))
  assert (mask.reshape(3, 2, 4).sum(-1) == 2).all()
  # A kernel whose input size is not a multiple of m is refused, naming the axis.
  with pytest.raises(ValueError, match=r'axis -2 .* has size 6'):
    prunax.SRSTE().target_sparsities({'k': jnp.ones((6, 8))})


# ------------------------------------------------------------------------ SynFlow


def _deep_mlp(depth, width, din, dout=10):
  """A bias-free ReLU MLP of ``depth`` kernels; the middle ones stacked and scanned."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
    'first': jax.random.normal(k1, (din, width)) / math.sqrt(din),
    'stack': jax.random.normal(k2, (depth - 2, width, width)) / math.sqrt(width),
    'last': jax.random.normal(k3, (width, dout)) / math.sqrt(width),
  }

  def apply_fn(p, x):
    x = jax.nn.relu(x @ p['first'])
    x, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p['stack'])
    return x @ p['last']

  return params, apply_fn


def _float64_synflow_log_scores(kernels, din):
  """SynFlow scores of a bias-free ReLU MLP on ones, in float64 log space.

  With |W| and a positive input, ReLU is the identity and R = 1^T |W_1| ... |W_L| 1, so
  dR/dW_l[i, j] = a_l[i] * b_l[j] with a_l = 1^T |W_1| ... |W_{l-1}| and
  b_l = |W_{l+1}| ... |W_L| 1. Returns log(a_l[i] |W_l[i, j]| b_l[j]) per kernel.
  """
  ws = [np.abs(np.asarray(k, np.float64)) for k in kernels]
  log_a, a, log_scale = [], np.ones(din), 0.0
  for w in ws:
    log_a.append(np.log(a) + log_scale)
    a = a @ w
    log_scale += np.log(a.max())
    a = a / a.max()
  log_b, b, log_scale = [], np.ones(ws[-1].shape[1]), 0.0
  for w in ws[::-1]:
    log_b.append(np.log(b) + log_scale)
    b = w @ b
    log_scale += np.log(b.max())
    b = b / b.max()
  log_b = log_b[::-1]
  with np.errstate(divide='ignore'):
    return [la[:, None] + np.log(w) + lb[None, :] for la, w, lb in zip(log_a, ws, log_b)]


def test_synflow_keeps_deep_networks_connected():
  depth, width, din, sparsity = 40, 256, 64, 0.9
  params, apply_fn = _deep_mlp(depth, width, din)
  # The direct flow overflows float32 (the case): every score would be inf.
  r = jnp.sum(apply_fn(jax.tree.map(jnp.abs, params), jnp.ones((1, din))))
  assert not np.isfinite(float(r))
  scores = pruning_at_init.synflow_scores(apply_fn, params, (1, din))
  for s in jax.tree.leaves(scores):
    assert np.isfinite(np.asarray(s)).all()
  masks = pruning_at_init.synflow(apply_fn, params, (1, din), sparsity, iterations=1)
  kernels = [params['first'], *params['stack'], params['last']]
  mask_list = [np.asarray(masks['first']), *np.asarray(masks['stack']), np.asarray(masks['last'])]
  for m in mask_list:
    assert m.any()  # no layer is cut off
  # The ranking is the exact (float64) one: every kept weight scores at least every
  # removed one, up to float32 rounding at the threshold.
  log_scores = _float64_synflow_log_scores(kernels, din)
  kept = np.concatenate([s[m] for s, m in zip(log_scores, mask_list)])
  removed = np.concatenate([s[~m] for s, m in zip(log_scores, mask_list)])
  assert kept.min() >= removed.max() - 1e-4
  n = sum(m.size for m in mask_list)
  assert sum(int(m.sum()) for m in mask_list) == n - round(sparsity * n)


def test_synflow_on_a_shallow_net_is_the_direct_formula():
  params = mlp_params(sizes=(12, 16, 8))
  params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 1 else x, params)  # nonzero biases

  def apply_fn(p, x):
    for i in range(2):
      x = x @ p[f'layer{i}']['kernel'] + p[f'layer{i}']['bias']
    return x

  def direct(p, masks):
    ab = jax.tree.map(jnp.abs, p)
    ab = jax.tree.map(
      lambda w, m: w if m is None else w * m, ab, masks, is_leaf=lambda x: x is None
    )
    g = jax.grad(lambda q: jnp.sum(apply_fn(q, jnp.ones((1, 12)))))(ab)
    return jax.tree.map(lambda gg, w: jnp.abs(gg * w), g, ab)

  got = pruning_at_init.synflow_scores(apply_fn, params, (1, 12))
  for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(direct(params, jax.tree.map(lambda _: None, params)))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Two rounds of the iterative rule, by hand, with one global threshold.
  masks = pruning_at_init.synflow(apply_fn, params, (1, 12), 0.75, iterations=2)
  selector = prunax.GlobalMagnitudePruning(sparsity=0.75)
  targets = selector.target_sparsities(params)
  want = jax.tree.map(
    lambda t, p: None if t is None else jnp.ones(p.shape, bool),
    targets,
    params,
    is_leaf=lambda x: x is None,
  )
  for k in (1, 2):
    s = direct(
      params,
      jax.tree.map(
        lambda m: None if m is None else m.astype(jnp.float32), want, is_leaf=lambda x: x is None
      ),
    )
    s = jax.tree.map(
      lambda m, x: x if m is None else jnp.where(m, x, -1.0), want, s, is_leaf=lambda x: x is None
    )
    now = np.float32(1 - (1 - 0.75) ** (k / 2))
    want = selector.masks_from_scores(
      s,
      jax.tree.map(
        lambda t, now=now: None if t is None else now, targets, is_leaf=lambda x: x is None
      ),
    )
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -------------------------------------------------------------------------- FLOPs


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, use_bias=False)(x)  # Dense_0: (4, 5)
    return nn.Dense(3, use_bias=False)(x)  # Dense_1: (5, 3)


def test_flops_rigl_convention_counts_three_forwards_per_layer():
  x = jnp.ones((2, 4))
  model = _TwoDense()
  params = model.init(jax.random.PRNGKey(0), x)
  counter = flops.FlopsCounter(model.apply, params, x)
  f1, f2 = 2 * 2 * 4 * 5, 2 * 2 * 5 * 3
  d1 = 0.5
  sparse = jax.tree.map(lambda a: a, params)
  k1 = np.asarray(params['params']['Dense_0']['kernel']).copy()
  k1.reshape(-1)[:10] = 0  # 10 of 20 zero
  k2 = np.asarray(params['params']['Dense_1']['kernel']).copy()
  k2.reshape(-1)[:12] = 0  # 3 of 15 nonzero
  d2 = 0.2
  sparse['params']['Dense_0']['kernel'] = jnp.asarray(k1)
  sparse['params']['Dense_1']['kernel'] = jnp.asarray(k2)
  # RigL appendix H: each layer costs 3 x its (sparse) forward; the first layer's input
  # gradient counts too.
  want = (3 * d1 * f1 + 3 * d2 * f2) / (3 * f1 + 3 * f2)
  assert counter.training_fraction(sparse, convention='rigl') == pytest.approx(want)
  # autodiff: no gradient for the data input of the first layer.
  want = (2 * d1 * f1 + 3 * d2 * f2) / (2 * f1 + 3 * f2)
  assert counter.training_fraction(sparse) == pytest.approx(want)
  averager = flops.TrainingFlopsAverager(counter, convention='rigl')
  averager.add(sparse)
  assert averager.fraction == pytest.approx((3 * d1 * f1 + 3 * d2 * f2) / (3 * f1 + 3 * f2))
  with pytest.raises(ValueError, match="'autodiff', 'rigl'"):
    counter.training_fraction(sparse, convention='paper')


# ------------------------------------------------------------------ gradual pruning scores


def test_gradual_magnitude_scores_the_weights_before_the_step():
  # One-shot at step 0 with sgd(1.0): the scores are |w| of the params the model saw, not
  # of w - g (the docstring's rule).
  params = {'w': jnp.asarray([[1.0, 2.0, 3.0, 4.0]])}
  grads = {'w': jnp.asarray([[0.0, 0.0, 0.0, 3.5]])}  # after the step w[3] = 0.5
  tx = prunax.MagnitudePruning(
    sparsity=0.5, sparsity_distribution_fn=lambda p, s: {'w': s}
  ).wrap_optax(optax.sgd(1.0))
  updates, state = tx.update(grads, tx.init(params), params)
  mask = np.asarray(prunax.bool_masks(state, params)['w'])
  np.testing.assert_array_equal(mask, [[False, False, True, True]])
  new = optax.apply_updates(params, updates)['w']
  np.testing.assert_allclose(np.asarray(new), [[0.0, 0.0, 3.0, 0.5]])

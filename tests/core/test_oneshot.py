"""One-shot pruning from calibration data (prunax.oneshot): numerics, capture, driver, sharding."""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import prunax
from prunax import oneshot
from prunax.sparsity_types import NByM
from prunax.sparsity_types import Unstructured
from tests.core.helpers import eight_device_report


def _inputs(kind: str, n: int, din: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, din)).astype(np.float32)
  if kind == 'random':  # A random covariance, features of very different scales (outliers).
    mix = rng.normal(size=(din, din)).astype(np.float32) / np.sqrt(din)
    return (x @ mix) * np.exp(rng.normal(size=din)).astype(np.float32)
  # Structured: a low-rank signal plus a little noise.
  return x[:, : din // 8] @ rng.normal(size=(din // 8, din)).astype(np.float32) + 0.1 * x


@pytest.mark.parametrize('kind', ['random', 'low_rank'])
@pytest.mark.parametrize('stype', [Unstructured(), NByM(2, 4, axis=0), NByM(4, 8, axis=0)])
@pytest.mark.parametrize('seed', [0, 1])
def test_reconstruction_error_ordering(kind, stype, seed):
  x = _inputs(kind, 512, 64, seed)
  w = np.random.default_rng(seed + 10).normal(size=(64, 48)).astype(np.float32)
  h = oneshot.gram(jnp.asarray(x))
  errors = {}
  for name in ('magnitude', 'wanda', 'sparsegpt'):
    kwargs = {'blocksize': 16} if name == 'sparsegpt' else {}
    new_w, keep = oneshot.get_method(name)(jnp.asarray(w), h, 0.5, stype, **kwargs)
    assert int(np.sum(~np.asarray(keep))) == w.size // 2
    assert np.all(np.asarray(new_w)[~np.asarray(keep)] == 0)
    direct = np.linalg.norm(x @ w - x @ np.asarray(new_w)) / np.linalg.norm(x @ w)
    errors[name] = float(oneshot.reconstruction_error(w, new_w, h))
    np.testing.assert_allclose(errors[name], direct, rtol=1e-3)
  assert errors['sparsegpt'] <= errors['wanda'] <= errors['magnitude'], errors


def test_independent_inputs_sparsegpt_close_to_wanda():
  """With uncorrelated inputs there is nothing for OBS to compensate: SparseGPT's per-block
  selection is then about as good as Wanda's per-output one (either may win), both far
  better than magnitude when the feature scales differ."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, 64)).astype(np.float32) * np.exp(rng.normal(size=64)).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32))
  h = oneshot.gram(jnp.asarray(x))
  err = {
    name: float(oneshot.reconstruction_error(w, oneshot.get_method(name)(w, h, 0.5)[0], h))
    for name in ('magnitude', 'wanda', 'sparsegpt')
  }
  assert err['wanda'] < 0.6 * err['magnitude'], err
  assert abs(err['sparsegpt'] - err['wanda']) < 0.1 * err['wanda'], err


def test_wanda_scores_by_hand():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  expected = np.zeros_like(w)
  for i in range(5):
    norm = np.sqrt(sum(float(x[t, i]) ** 2 for t in range(7)))
    for j in range(3):
      expected[i, j] = abs(float(w[i, j])) * norm
  np.testing.assert_allclose(oneshot.wanda_scores(w, x), expected, rtol=1e-6)
  # wanda_prune compares the same scores per output: the pruned ones are each column's smallest.
  _, keep = oneshot.wanda_prune(jnp.asarray(w), oneshot.gram(jnp.asarray(x)), 0.4)
  for j in range(3):
    pruned = set(np.argsort(expected[:, j])[:2])
    assert pruned == set(np.flatnonzero(~np.asarray(keep[:, j])))


def _random_hessian(din, seed):
  x = np.random.default_rng(seed).normal(size=(4 * din, din)).astype(np.float32)
  return oneshot.gram(jnp.asarray(x))


def test_sparsegpt_zero_sparsity_returns_weights():
  w = jax.random.normal(jax.random.PRNGKey(0), (40, 24))
  new_w, keep = oneshot.sparsegpt_prune(w, _random_hessian(40, 1), 0.0, blocksize=16)
  assert bool(keep.all())
  np.testing.assert_array_equal(new_w, w)


@pytest.mark.parametrize('q', [0, 5])
def test_sparsegpt_update_is_the_obs_solve(q):
  """One pruned weight of a one-output layer, exact inverse (no dampening).

  Column q is the only pruned weight (its magnitude is tiny). SparseGPT fixes the columns
  before q, so its update is OBS on the inputs q..in-1: delta = -w_q / [G^-1]_qq * G^-1[:, q]
  with G = H[q:, q:] (for q = 0 the full Hessian).
  """
  din = 12
  h = np.asarray(_random_hessian(din, 3), np.float64)
  w = np.random.default_rng(4).normal(size=(din, 1)) + 3.0
  w[q, 0] = 1e-3
  new_w, keep = oneshot.sparsegpt_prune(
    jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), 1.0 / din, blocksize=din, percdamp=0.0
  )
  assert np.flatnonzero(~np.asarray(keep[:, 0])).tolist() == [q]
  ginv = np.linalg.inv(h[q:, q:])
  expected = w.copy()
  expected[q:, 0] += -w[q, 0] / ginv[0, 0] * ginv[:, 0]
  np.testing.assert_allclose(np.asarray(new_w), expected, rtol=1e-4, atol=1e-5)
  assert new_w[q, 0] == 0


@pytest.mark.parametrize('name', ['magnitude', 'wanda', 'sparsegpt'])
@pytest.mark.parametrize('n,m', [(2, 4), (1, 4), (4, 8)])
def test_n_by_m_counts_along_the_input(name, n, m):
  w = jax.random.normal(jax.random.PRNGKey(0), (32, 6))
  kwargs = {'blocksize': 16} if name == 'sparsegpt' else {}
  new_w, keep = oneshot.get_method(name)(
    w, _random_hessian(32, 5), 0.5, NByM(n, m, axis=0), **kwargs
  )
  per_group = np.asarray(keep).reshape(32 // m, m, 6).sum(axis=1)
  assert (per_group == n).all()
  assert np.all(np.asarray(new_w)[~np.asarray(keep)] == 0)


@pytest.mark.parametrize('sparsity', [0.3, 0.55, 0.9])
def test_unstructured_counts_are_exact(sparsity):
  din, dout = 37, 11  # blocks of 16 do not divide the inputs
  w = jax.random.normal(jax.random.PRNGKey(2), (din, dout))
  h = _random_hessian(din, 6)
  zeros = int(prunax.sparsity_types.num_zeros(sparsity, din * dout))
  for name, kwargs in [('magnitude', {}), ('sparsegpt', {'blocksize': 16})]:
    _, keep = oneshot.get_method(name)(w, h, sparsity, **kwargs)
    assert int(np.sum(~np.asarray(keep))) == zeros, name
  _, keep = oneshot.wanda_prune(w, h, sparsity)
  per_output = int(prunax.sparsity_types.num_zeros(sparsity, din))
  assert (np.sum(~np.asarray(keep), axis=0) == per_output).all()


def test_sparsegpt_dead_inputs_are_zeroed():
  x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  x[:, 3] = 0.0
  w = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  new_w, _ = oneshot.sparsegpt_prune(w, oneshot.gram(jnp.asarray(x)), 0.25, blocksize=8)
  assert np.all(np.asarray(new_w)[3] == 0)
  assert np.all(np.isfinite(np.asarray(new_w)))


def test_bad_arguments_name_the_value():
  w, h = jnp.ones((8, 4)), jnp.eye(8)
  with pytest.raises(ValueError, match='sparsity must be in'):
    oneshot.sparsegpt_prune(w, h, 1.5)
  with pytest.raises(ValueError, match='axis=0'):
    oneshot.wanda_prune(w, h, 0.5, NByM(2, 4))
  with pytest.raises(ValueError, match='Unknown one-shot method'):
    oneshot.get_method('obc')
  with pytest.raises(ValueError, match='sparsity_type must be'):
    oneshot.parse_sparsity_type('2-4')


# ----------------------------------------------------------------------------- capture


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(8)(x)) + x, None


class _LinenModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(20, 8)(tokens)
    x = nn.Dense(8)(x)
    x, _ = nn.scan(
      _ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=3
    )()(x, None)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x)
    x = nn.Einsum((8, 2, 4), '...d,dhk->...hk')(x)
    return nn.DenseGeneral(5, axis=(-2, -1))(x)


@pytest.fixture(scope='module')
def linen_model():
  model = _LinenModel()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 20)
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  return model, params, tokens


def _assert_masked_zero(masks, params):
  checked = jax.tree.map(
    lambda m, x: None if m is None else bool(np.all(np.asarray(x)[~m] == 0)),
    masks,
    params,
    is_leaf=lambda x: x is None,
  )
  assert jax.tree.leaves(checked) and all(jax.tree.leaves(checked))


def test_find_sites_linen(linen_model):
  model, params, tokens = linen_model
  sites, non_kernel = oneshot.find_sites(lambda p, t: model.apply({'params': p}, t), params, tokens)
  names = [s.name for s in sites]
  assert names == [
    'Dense_0/kernel',
    'Scan_ScanBlock_0/Dense_0/kernel[0]',
    'Scan_ScanBlock_0/Dense_0/kernel[1]',
    'Scan_ScanBlock_0/Dense_0/kernel[2]',
    'MultiHeadDotProductAttention_0/query/kernel',
    'MultiHeadDotProductAttention_0/key/kernel',
    'MultiHeadDotProductAttention_0/value/kernel',
    'MultiHeadDotProductAttention_0/out/kernel',
    'Einsum_0/kernel',
    'DenseGeneral_0/kernel',
  ]
  by_name = {s.name: s for s in sites}
  # q, k and v read the same input: one calibration group.
  groups = {
    by_name[f'MultiHeadDotProductAttention_0/{k}/kernel'].group for k in ('query', 'key', 'value')
  }
  assert len(groups) == 1
  assert by_name['MultiHeadDotProductAttention_0/out/kernel'].in_dims == (0, 1)
  assert by_name['DenseGeneral_0/kernel'].in_dims == (0, 1)
  leaf_names = [
    prunax.sparsity_distributions.path_name(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  assert {leaf_names[i] for i in non_kernel} >= {'Embed_0/embedding'}


def test_gram_of_scanned_slices_is_their_input(linen_model):
  model, params, tokens = linen_model
  apply_fn = lambda p, t: model.apply({'params': p}, t)  # noqa: E731
  sites, _ = oneshot.find_sites(apply_fn, params, tokens)
  wanted = [s for s in sites if s.name.startswith('Scan_') or s.name == 'Dense_0/kernel']
  grams, counts = oneshot.capture.make_gram_fn(apply_fn, params, tokens, wanted)(params, tokens)
  x = params['Embed_0']['embedding'][tokens]
  expected = [x]  # Dense_0 reads the embeddings; slice l reads the output of slice l - 1.
  x = x @ params['Dense_0']['kernel'] + params['Dense_0']['bias']
  scan = params['Scan_ScanBlock_0']['Dense_0']
  for layer in range(3):
    expected.append(x)
    x = jax.nn.relu(x @ scan['kernel'][layer] + scan['bias'][layer]) + x
  for g, c, e in zip(grams, counts, expected):
    e = np.asarray(e).reshape(-1, 8)
    assert c == e.shape[0]
    np.testing.assert_allclose(g, e.T @ e, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def linen_result(linen_model):
  model, params, _ = linen_model
  batches = [jax.random.randint(jax.random.PRNGKey(i), (4, 6), 0, 20) for i in range(2)]
  return oneshot.prune(
    lambda p, t: model.apply({'params': p}, t),
    params,
    batches,
    method='sparsegpt',
    sparsity=0.5,
    sparsity_type='2:4',
    blocksize=8,
  )


def test_prune_linen_scanned_and_attention(linen_result):
  result = linen_result
  assert len(result.table) == 10
  assert result.masks['Embed_0']['embedding'] is None
  assert result.masks['Scan_ScanBlock_0']['Dense_0']['bias'] is None
  stacked = np.asarray(result.masks['Scan_ScanBlock_0']['Dense_0']['kernel'])
  assert stacked.shape == (3, 8, 8)
  assert (stacked.reshape(3, 2, 4, 8).sum(axis=2) == 2).all()
  out_mask = np.asarray(result.masks['MultiHeadDotProductAttention_0']['out']['kernel'])
  assert (out_mask.reshape(2, 4, 8).reshape(2, 1, 4, 8).sum(axis=2) == 2).all()  # per head group
  _assert_masked_zero(result.masks, result.params)
  summary = prunax.summarize_sparsity(result.masks)
  assert summary['sparsity/Scan_ScanBlock_0/Dense_0/kernel'] == 0.5
  assert all(0 <= r.error < 1 for r in result.table)


def test_masks_feed_fixed_mask_sparse_training(linen_model, linen_result):
  model, _, tokens = linen_model
  result = linen_result
  tx = prunax.pruning_at_init.FixedMaskSparse(masks=result.masks).wrap_optax(optax.adam(1e-2))

  def loss(p):
    return jnp.mean(model.apply({'params': p}, tokens) ** 2)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  p, state = result.params, jax.jit(tx.init)(result.params)
  for _ in range(2):
    p, state = step(p, state)
  _assert_masked_zero(result.masks, p)


def test_non_kernel_in_the_sparsity_map_is_an_error(linen_model):
  model, params, tokens = linen_model
  with pytest.raises(ValueError, match='Embed_0/embedding.*matmul'):
    oneshot.prune(
      lambda p, t: model.apply({'params': p}, t),
      params,
      [tokens],
      sparsity_distribution={'Embed_0/embedding': 0.5},
    )


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(12, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def _two_layer_grams(fc1_kernel, fc1_bias, x):
  h = np.tanh(np.asarray(x @ fc1_kernel + fc1_bias))
  return np.asarray(oneshot.gram(jnp.asarray(x))), np.asarray(oneshot.gram(jnp.asarray(h)))


@pytest.mark.parametrize('sequential', [True, False])
def test_nnx_sequential_and_dense_inputs(sequential):
  model = _NnxMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 12)) * jnp.exp(
    jax.random.normal(jax.random.PRNGKey(2), (12,))
  )

  def apply_fn(s, batch):
    return nnx.merge(graphdef, s)(batch)

  result = oneshot.prune(
    apply_fn,
    state,
    [x[:32], x[32:]],
    method='sparsegpt',
    sparsity=0.5,
    sequential=sequential,
    blocksize=8,
  )
  assert [r.layer for r in result.table] == ['fc1/kernel', 'fc2/kernel']
  w1, b1 = state['fc1']['kernel'][...], state['fc1']['bias'][...]
  new_w1 = result.params['fc1']['kernel'][...]
  h1, _ = _two_layer_grams(w1, b1, x)
  expected1, _ = oneshot.sparsegpt_prune(w1, jnp.asarray(h1), 0.5, blocksize=8)
  np.testing.assert_allclose(new_w1, expected1, rtol=1e-4, atol=1e-5)
  # fc2's inputs come through the pruned fc1 (sequential) or the dense one.
  _, h2 = _two_layer_grams(new_w1 if sequential else w1, b1, x)
  w2 = state['fc2']['kernel'][...]
  expected2, _ = oneshot.sparsegpt_prune(w2, jnp.asarray(h2), 0.5, blocksize=8)
  np.testing.assert_allclose(result.params['fc2']['kernel'][...], expected2, rtol=1e-4, atol=1e-5)
  _, other = _two_layer_grams(w1 if sequential else new_w1, b1, x)
  assert not np.allclose(h2, other, rtol=1e-3)  # the two modes calibrate fc2 differently
  nnx.update(model, result.params)
  assert float(jnp.mean(model.fc1.kernel[...] == 0)) == 0.5


# ----------------------------------------------------------------------------- sharding

SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from prunax import oneshot
    from prunax.sparsity_types import NByM
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32) * np.exp(rng.normal(size=64)).astype(
        np.float32)
    params = {'w1': rng.normal(size=(64, 128)).astype(np.float32) / 8,
              'w2': rng.normal(size=(128, 32)).astype(np.float32) / 11}
    def apply_fn(p, batch):
      return jnp.tanh(batch @ p['w1']) @ p['w2']
    batches = [x[:128], x[128:]]
    specs = {'w1': P(None, 'model'), 'w2': P('model', None)}
    report = {}
    for stype in ('unstructured', '2:4'):
      results = []
      for sharded in (False, True):
        p, b = params, batches
        if sharded:
          p = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
          b = [jax.device_put(z, NamedSharding(mesh, P('data', None))) for z in batches]
        results.append(oneshot.prune(apply_fn, p, b, method='sparsegpt', sparsity=0.5,
                                     sparsity_type=stype, blocksize=32))
      one, eight = results
      report[stype] = {
          'masks_equal': all(bool((a == b).all()) for a, b in
                             zip(jax.tree.leaves(one.masks), jax.tree.leaves(eight.masks))),
          'max_gap': max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                         for a, b in zip(jax.tree.leaves(one.params),
                                         jax.tree.leaves(eight.params))),
          'devices': len(eight.params['w1'].sharding.device_set)}
    # The solve itself, jitted with a sharded kernel and Hessian.
    w, h = params['w1'], oneshot.gram(jnp.asarray(x))
    one = oneshot.sparsegpt_prune(jnp.asarray(w), h, 0.5, blocksize=32)
    ws = jax.device_put(w, NamedSharding(mesh, P(None, 'model')))
    hs = jax.device_put(h, NamedSharding(mesh, P('model', None)))
    eight = oneshot.sparsegpt_prune(ws, hs, 0.5, blocksize=32)
    report['solve'] = {'masks_equal': bool((one[1] == eight[1]).all()),
                       'max_gap': float(jnp.max(jnp.abs(one[0] - eight[0])) /
                                        jnp.max(jnp.abs(one[0]))),
                       'devices': len(eight[0].sharding.device_set)}
    # A convolution and a per-head kernel, sharded on their output channels and heads.
    conv_params = {
        'conv': rng.normal(size=(3, 3, 8, 16)).astype(np.float32) / 8,
        'heads': rng.normal(size=(4, 16, 8)).astype(np.float32) / 4}
    images = rng.normal(size=(8, 6, 6, 8)).astype(np.float32)
    def conv_fn(p, batch):
      y = jax.lax.conv_general_dilated(batch, p['conv'], (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      y = jnp.tanh(y).reshape(y.shape[0], -1, 4, 16)  # (batch, tokens, heads, 16)
      return jnp.einsum('bthd,hdk->bthk', y, p['heads'])
    conv_specs = {'conv': P(None, None, None, 'model'), 'heads': P('model', None, None)}
    conv_batches = [images[:4], images[4:]]
    for stype in ('unstructured', '2:4'):
      results = []
      for sharded in (False, True):
        p, b = conv_params, conv_batches
        if sharded:
          p = jax.device_put(p, {k: NamedSharding(mesh, s) for k, s in conv_specs.items()})
          b = [jax.device_put(z, NamedSharding(mesh, P('data'))) for z in conv_batches]
        results.append(oneshot.prune(conv_fn, p, b, method='sparsegpt', sparsity=0.5,
                                     sparsity_type=stype, blocksize=8))
      one, eight = results
      report['conv_heads_' + stype] = {
          'masks_equal': all(bool((a == b).all()) for a, b in
                             zip(jax.tree.leaves(one.masks), jax.tree.leaves(eight.masks))),
          'max_gap': max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                         for a, b in zip(jax.tree.leaves(one.params),
                                         jax.tree.leaves(eight.params))),
          'sites': len(one.table),
          'devices': min(len(x.sharding.device_set) for x in jax.tree.leaves(eight.params))}
    print('REPORT' + json.dumps(report))
""")


@pytest.fixture(scope='module')
def sharded_report():
  return eight_device_report(SHARDED, timeout=900)


@pytest.mark.parametrize(
  'case', ['unstructured', '2:4', 'solve', 'conv_heads_unstructured', 'conv_heads_2:4']
)
def test_eight_devices_match_one(sharded_report, case):
  r = sharded_report[case]
  assert r['masks_equal'], r
  assert r['max_gap'] < 1e-4, r
  assert r['devices'] == 8 or case in ('unstructured', '2:4'), r
  if case.startswith('conv_heads'):
    assert r['sites'] == 5, r  # the conv and each of the 4 heads


# ----------------------------------------------------------------------------- command

MODEL_FILE = """
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass  # needs its module registered while the file runs
class Sizes:
  inputs: int = 8


def get_model(width=16):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"fc1": {"kernel": jax.random.normal(k[0], (8, width)), "bias": jnp.zeros(width)},
            "fc2": {"kernel": jax.random.normal(k[1], (width, 4)), "bias": jnp.zeros(4)}}
  def apply_fn(p, x):
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  x = jax.random.normal(k[2], (64, Sizes().inputs))
  return {"apply_fn": apply_fn, "params": params, "batches": [x[:32], x[32:]]}
"""


def test_command_writes_params_masks_and_table(tmp_path):
  from prunax import cli

  model_file = tmp_path / 'model.py'
  model_file.write_text(MODEL_FILE)
  config = tmp_path / 'config.yaml'
  config.write_text('method: wanda\nsparsity_type: "2:4"\nmodel_args: {width: 12}\n')
  out = tmp_path / 'out'
  argv = [
    'oneshot',
    '--config',
    str(config),
    '--model',
    f'{model_file}:get_model',
    '--out',
    str(out),
    '--no-progress',
  ]
  assert cli.main(argv) == 0
  masks = np.load(out / 'masks.npz')
  assert sorted(masks.files) == ['fc1/kernel', 'fc2/kernel']
  assert masks['fc1/kernel'].shape == (8, 12)
  assert (masks['fc1/kernel'].reshape(2, 4, 12).sum(axis=1) == 2).all()
  params = np.load(out / 'pruned_params.npz')
  assert np.all(params['fc2/kernel'][~masks['fc2/kernel']] == 0)
  rows = (out / 'table.csv').read_text().splitlines()
  assert rows[0] == 'layer,in,out,sparsity,error,seconds' and len(rows) == 3
  assert rows[1].startswith('fc1/kernel,8,12,0.5')
  bad = tmp_path / 'bad.yaml'
  bad.write_text('metod: wanda\n')
  assert cli.main(['oneshot', '--config', str(bad), '--model', f'{model_file}:get_model']) == 2


class _NnxLayer(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.lin(x)) + x


class _NnxScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxLayer(rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    return body(x, self.layers)


def test_nnx_scanned_layers_are_separate_sites():
  graphdef, state = nnx.split(_NnxScanned(nnx.Rngs(0)))

  def apply_fn(s, x):
    return nnx.merge(graphdef, s)(x)

  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
  sites, _ = oneshot.find_sites(apply_fn, state, x)
  assert [s.name for s in sites] == [f'layers/lin/kernel[{i}]' for i in range(3)]
  grams, _ = oneshot.capture.make_gram_fn(apply_fn, state, x, sites[1:2])(state, x)
  kernel, bias = state['layers']['lin']['kernel'][...], state['layers']['lin']['bias'][...]
  h = jax.nn.relu(x @ kernel[0] + bias[0]) + x  # layer 1 reads layer 0's output
  np.testing.assert_allclose(grams[0], h.T @ h, rtol=1e-4, atol=1e-4)


def _mlp_model():
  namespace = {}
  exec(MODEL_FILE, namespace)  # noqa: S102 - the model of the command test, as a function
  return namespace['get_model']()


def test_sparsity_distributions_map_and_erk():
  model = _mlp_model()
  result = oneshot.prune(
    model['apply_fn'],
    model['params'],
    model['batches'],
    method='wanda',
    sparsity_distribution={'fc2/ker.*': 0.75},
  )
  assert result.masks['fc1']['kernel'] is None
  assert [r.layer for r in result.table] == ['fc2/kernel']
  assert float(jnp.mean(~result.masks['fc2']['kernel'])) == 0.75
  erk = oneshot.prune(
    model['apply_fn'],
    model['params'],
    model['batches'],
    method='magnitude',
    sparsity=0.5,
    sparsity_distribution='erk',
  )
  expected = prunax.sparsity_distributions.erk(
    model['params'], 0.5, filter_fn=lambda name, leaf: name.endswith('kernel')
  )
  for layer in ('fc1', 'fc2'):
    size = model['params'][layer]['kernel'].size
    zeros = int(prunax.sparsity_types.num_zeros(expected[layer]['kernel'], size))
    assert int(jnp.sum(~erk.masks[layer]['kernel'])) == zeros


class _RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.gelu(nn.Dense(8)(x))


class _RematBf16(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(_RematBlock)()(x)
    x = jax.jit(lambda y: y * 2)(x)
    return nn.Dense(4, dtype=jnp.bfloat16)(x)  # the kernel is cast to bf16 before the matmul


def test_find_sites_through_remat_jit_and_casts():
  model, x = _RematBf16(), jnp.ones((3, 8))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  sites, _ = oneshot.find_sites(lambda p, b: model.apply({'params': p}, b), params, x)
  assert [s.name for s in sites] == ['Checkpoint_RematBlock_0/Dense_0/kernel', 'Dense_0/kernel']


# ----------------------------------------------------------------------------- conv, heads


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 2), strides=(2, 1), padding='SAME', kernel_dilation=(1, 2))(x)
    x = nn.Conv(8, (3, 3), padding='VALID')(nn.relu(x))
    x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise: not a site
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _site_matrices(apply_fn, params, batch):
  """{site name: (in_dims, the site's (tokens, features) input matrix)}."""
  leaves, treedef = jax.tree.flatten(params)
  names = [
    prunax.sparsity_distributions.path_name(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  closed = jax.make_jaxpr(lambda ls, b: apply_fn(jax.tree.unflatten(treedef, ls), b))(leaves, batch)
  got = {}

  def on_site(origin, in_dims, x, share_key, to_matrix):
    got[names[origin.leaf] + oneshot.capture.index_name(origin.index)] = (in_dims, to_matrix())

  oneshot.capture._Interpreter(on_site).run(
    closed,
    [*leaves, batch],
    [oneshot.capture.Origin(i) for i in range(len(leaves))] + [None],
  )
  return got


def test_conv_sites_read_their_input_patches():
  model = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 8, 8))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)  # noqa: E731
  sites, non_kernel = oneshot.find_sites(apply_fn, params, x)
  assert [s.name for s in sites] == ['Conv_0/kernel', 'Conv_1/kernel', 'Dense_0/kernel']
  assert sites[0].in_dims == (0, 1, 2)  # (kh, kw, in): N:M groups along input channels
  leaf_names = [
    prunax.sparsity_distributions.path_name(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  assert {leaf_names[i]: op for i, op in non_kernel.items()}['Conv_2/kernel'] == (
    'conv_general_dilated with feature groups'
  )
  # Every conv is its patch matrix times the filter as an (kh * kw * in, out) matrix.
  matrices = _site_matrices(apply_fn, params, x)
  h = x
  for name, conv in (('Conv_0', dict(strides=(2, 1), padding='SAME', dil=(1, 2))),):
    kernel = params[name]['kernel']
    in_dims, X = matrices[f'{name}/kernel']
    y = jax.lax.conv_general_dilated(
      h,
      kernel,
      conv['strides'],
      conv['padding'],
      rhs_dilation=conv['dil'],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest',
    )
    W = oneshot.capture.kernel_matrix(kernel, in_dims)
    assert X.shape == (y.size // 8, 3 * 2 * 8)
    np.testing.assert_allclose(X @ W, y.reshape(-1, 8), rtol=1e-5, atol=1e-5)
  grams, counts = oneshot.capture.make_gram_fn(apply_fn, params, x, sites[:1])(params, x)
  X = np.asarray(matrices['Conv_0/kernel'][1])
  assert counts[0] == X.shape[0]
  np.testing.assert_allclose(grams[0], X.T @ X, rtol=1e-4, atol=1e-4)
  # Grouped convolutions stay dense; naming one is an error that names the op.
  with pytest.raises(ValueError, match='Conv_2/kernel.*feature groups'):
    oneshot.prune(apply_fn, params, [x], sparsity_distribution={'Conv_2/kernel': 0.5})


def test_conv_n_by_m_runs_along_input_channels():
  model = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 8, 8))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  result = oneshot.prune(
    lambda p, b: model.apply({'params': p}, b),
    params,
    [x],
    method='wanda',
    sparsity_type='2:4',
  )
  mask = np.asarray(result.masks['Conv_1']['kernel'])  # (kh, kw, in, out)
  assert (mask.reshape(3, 3, 2, 4, 8).sum(axis=3) == 2).all()
  assert result.masks['Conv_2']['kernel'] is None
  _assert_masked_zero(result.masks, result.params)


class _PerHead(nn.Module):
  """Per-head projections as batched matmuls: heads lead one kernel, sit inside the other."""

  @nn.compact
  def __call__(self, x):  # x: (batch, heads=3, 4)
    wa = self.param('wa', nn.initializers.normal(1.0), (3, 4, 5))
    wb = self.param('wb', nn.initializers.normal(1.0), (5, 3, 2))
    h = jnp.tanh(jnp.einsum('bhd,hdk->bhk', x, wa))
    return jnp.einsum('bhk,khe->bhe', h, wb)


def test_heads_of_a_batched_kernel_are_pruned_separately():
  model = _PerHead()
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 3, 4)) * jnp.array([1.0, 5.0, 0.2])[:, None]
  params = model.init(jax.random.PRNGKey(0), x)['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)  # noqa: E731
  sites, _ = oneshot.find_sites(apply_fn, params, x)
  assert [s.name for s in sites] == [
    'wa[0]',
    'wa[1]',
    'wa[2]',
    'wb[:, 0]',
    'wb[:, 1]',
    'wb[:, 2]',
  ]
  assert all(s.in_dims == (0,) for s in sites)
  result = oneshot.prune(apply_fn, params, [x], method='wanda', sparsity=0.5, sequential=False)
  h = jnp.tanh(jnp.einsum('bhd,hdk->bhk', x, params['wa']))
  for head in range(3):  # Each head against Wanda on that head's own inputs.
    want, _ = oneshot.wanda_prune(params['wa'][head], oneshot.gram(x[:, head]), 0.5)
    np.testing.assert_array_equal(result.params['wa'][head], want)
    want, _ = oneshot.wanda_prune(params['wb'][:, head], oneshot.gram(h[:, head]), 0.5)
    np.testing.assert_array_equal(result.params['wb'][:, head], want)
  assert [r.shape for r in result.table] == [(4, 5)] * 3 + [(5, 2)] * 3


def test_conv_and_head_results_feed_export_summary_flops_and_training():
  model = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 8, 8))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)  # noqa: E731
  result = oneshot.prune(apply_fn, params, [x], method='sparsegpt', sparsity=0.75, blocksize=8)
  summary = prunax.summarize_sparsity(result.masks)
  assert summary['sparsity/Conv_0/kernel'] == 0.75
  counter = prunax.flops.FlopsCounter(apply_fn, params, x)
  assert counter.inference_fraction(result.params) < 0.3
  exported = prunax.export.export_params({'params': result.params}, 'bcoo')
  got = jax.jit(lambda p, b: prunax.export.sparse_apply(model, p, b))(exported, x)
  np.testing.assert_allclose(got, apply_fn(result.params, x), rtol=1e-5, atol=1e-5)
  tx = prunax.pruning_at_init.FixedMaskSparse(masks=result.masks).wrap_optax(optax.sgd(0.1))
  grads = jax.grad(lambda p: jnp.sum(apply_fn(p, x) ** 2))(result.params)
  updates, _ = tx.update(grads, tx.init(result.params), result.params)
  _assert_masked_zero(result.masks, optax.apply_updates(result.params, updates))

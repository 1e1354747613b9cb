"""Sparse export: exact round trips, documented sizes, sparse inference, save/load."""

import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import export
from tests.core.helpers import xla_compiles


def pruned_params(seed=0, sparsity=0.9, shape=(64, 48)):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  w[rng.random(shape) < sparsity] = 0.0
  w.flat[:3] = [-0.0, np.nan, -np.inf]  # bits that a value-based export would lose
  return {
    'dense': {'kernel': jnp.asarray(w), 'bias': jnp.arange(shape[1], dtype=jnp.float32)},
    'conv': jnp.asarray(w.reshape(4, 4, -1, 12)),
  }


def bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('fmt', ['bcoo', 'bcsr'])
def test_bcoo_bcsr_round_trip_is_bit_identical(fmt):
  params = pruned_params()
  exported = export.export_params(params, fmt)
  assert isinstance(exported['dense']['kernel'], (export.sparse.BCOO, export.sparse.BCSR))
  assert isinstance(exported['dense']['bias'], jax.Array)  # 1-D leaves stay dense
  for a, b in zip(bits(export.densify(exported)), bits(params)):
    np.testing.assert_array_equal(a, b)
  back = jax.jit(export.densify)(exported)
  for a, b in zip(bits(back), bits(params)):
    np.testing.assert_array_equal(a, b)


def test_bcoo_size_at_90_percent():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((256, 256)).astype(np.float32)
  keep = np.asarray(prunax.selection.topk_mask(jnp.asarray(np.abs(w)), int(0.1 * w.size)))
  exported = export.to_bcoo(np.where(keep, w, 0))
  assert exported.nse == int(0.1 * w.size)
  assert export.nbytes(exported) / w.nbytes == pytest.approx(0.3, abs=1e-3)  # <= 0.35


def test_nm_round_trip_and_size():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((32, 64)).astype(np.float32)
  for axis in (-1, 0):
    keep = np.asarray(prunax.selection.n_by_m_mask(jnp.asarray(np.abs(w)), 2, 4, axis))
    sparse_w = np.where(keep, w, 0).astype(np.float32)
    sparse_w[0, :4] = [0.0, -0.0, 0.0, 0.0] if axis == -1 else sparse_w[0, :4]
    c = export.to_nm(sparse_w, 2, 4, axis)
    np.testing.assert_array_equal(np.asarray(c.todense()).view(np.uint32), sparse_w.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda c: c.todense())(c)), sparse_w)
    assert c.nbytes / sparse_w.nbytes == 0.53125  # values 0.5 + 2-bit positions; <= 0.5625
  with pytest.raises(ValueError, match='at most 2'):
    export.to_nm(w, 2, 4)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


@pytest.mark.parametrize('model,shape', [(MLP(), (5, 32)), (CNN(), (2, 8, 8, 3))])
@pytest.mark.parametrize('fmt', ['bcoo', 'bcsr'])
def test_sparse_inference_matches_masked_dense(model, shape, fmt):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = model.init(jax.random.PRNGKey(0), x)
  pruner = prunax.MagnitudePruning(sparsity=0.8)
  sparse_params, _ = pruner.instant_sparsify(params)
  exported = export.export_params(sparse_params, fmt)
  want = model.apply(sparse_params, x)
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(exported, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fmt', ['bcoo', 'bcsr', 'nm'])
def test_save_load_round_trip(tmp_path, fmt):
  params = pruned_params(sparsity=0.0 if fmt == 'nm' else 0.9)
  if fmt == 'nm':  # NByM's default axis (the input axis) is also export's default.
    params = jax.tree.map(
      lambda x: (
        x
        if x.ndim < 2
        else jnp.where(prunax.NByM(2, 4).mask(jnp.abs(jnp.nan_to_num(x)), 0.5), x, 0)
      ),
      params,
    )
  exported = export.export_params(params, fmt)
  export.save(tmp_path / 'model.npz', exported)
  loaded = export.load(tmp_path / 'model.npz')
  assert export.nbytes(loaded) == export.nbytes(exported)
  for a, b in zip(bits(export.densify(loaded)), bits(params)):
    np.testing.assert_array_equal(a, b)


def test_ell_leaves_of_one_shape_with_different_widths_share_a_densify_program():
  # Every ELL leaf's width is its fullest column's count, so leaves of one shape compiled
  # a program each (40 programs for the transformer LM's 110 leaves); on the host they are
  # padded to a shared width: one program for widths 9, 10 and 11 (shared width 12).
  rng = np.random.default_rng(3)
  ws = []
  for width in (9, 10, 11):
    w = np.zeros((40, 26), np.float32)  # a shape no other test uses
    for col in range(26):
      n = width if col == 5 else int(rng.integers(0, width))
      w[rng.choice(40, n, replace=False), col] = rng.standard_normal(n)
    w[w == w[:, 5].min()] = -0.0  # a stored -0.0 stays -0.0
    ws.append(w)
  layouts = [prunax.sparse_inference.to_ell(w) for w in ws]
  assert [x.width for x in layouts] == [9, 10, 11]
  convs = [prunax.sparse_inference.to_conv_filter(w.reshape(2, 20, 26), 'ell') for w in ws]
  for kind, leaves in (('ell', layouts), ('conv', convs)):
    for i, (leaf, w) in enumerate(zip(leaves, ws, strict=True)):
      want = w if kind == 'ell' else w.reshape(2, 20, 26)
      densified_in_compiles(leaf, want, 1 if i == 0 else 0, (kind, i))
  # Traced, a layout is densified at its own width; the result is the same.
  traced = jax.jit(lambda x: x.todense())(layouts[1])
  np.testing.assert_array_equal(np.asarray(traced).view(np.uint32), ws[1].view(np.uint32))


@hypothesis.given(hypothesis.strategies.integers(1, 1 << 20))
def test_shared_widths_pad_at_most_half_and_two_per_octave(width):
  shared = prunax.sparse_inference.shared_width(width)
  assert width <= shared <= max(width, 1.5 * width)
  if width > 4:  # the octave (2**k, 2**(k + 1)] holding width has two shared widths
    top = 1 << (width - 1).bit_length()
    assert shared in (top * 3 // 4, top)
  else:
    assert shared == width


def test_bad_format():
  with pytest.raises(ValueError, match='valid formats'):
    export.export_params({'w': jnp.ones((4, 4))}, 'csr')


def test_densifying_a_leaf_outside_jit_compiles_one_program():
  # Op by op, every operation of a densification compiled for each new shape (5-13
  # programs a leaf); now one program per type and shapes, none for the same again.
  rng = np.random.default_rng(2)
  w = rng.standard_normal((44, 36)).astype(np.float32)  # shapes no other test uses
  w[rng.random(w.shape) < 0.8] = 0.0
  nm = np.asarray(prunax.selection.n_by_m_mask(jnp.asarray(np.abs(w)), 2, 4, 0))
  stack = np.stack([w, w[::-1]])
  leaves = {
    'bcoo': export.to_bcoo(w),
    'bcsr': export.export_params({'k': w}, 'bcsr')['k'],
    'nm': export.to_nm(np.where(nm, w, 0), 2, 4, 0),
    'block': prunax.sparse_inference.to_block(w, (8, 8)),
    'ell': prunax.sparse_inference.to_ell(w),
    'stacked_ell': prunax.sparse_inference.stack_layers(stack, 'ell', 0),
    'conv': prunax.sparse_inference.to_conv_filter(w.reshape(2, 2, 11, 36)),
  }
  wants = {'nm': np.where(nm, w, 0), 'stacked_ell': stack, 'conv': w.reshape(2, 2, 11, 36)}
  for name, leaf in leaves.items():
    for again in (False, True):
      densified_in_compiles(leaf, wants.get(name, w), 0 if again else 1, (name, again))


def densified_in_compiles(leaf, want: np.ndarray, compiles: int, what) -> None:
  """``export.todense(leaf)`` is ``want`` bit for bit and ran ``compiles`` XLA compiles."""
  with xla_compiles() as seconds:
    dense = export.todense(leaf)
  assert len(seconds) == compiles, (what, len(seconds))
  np.testing.assert_array_equal(np.asarray(dense).view(np.uint32), want.view(np.uint32), str(what))

"""Block-sparse and ELL layouts: exact round trips, products equal to the masked dense
product, format selection, and sparse inference of block-pruned Flax models."""

import warnings

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prunax
from prunax import export
from prunax import sparse_inference as si

from .helpers import BoxedScan
from .helpers import nnx_scanned_stack


def block_pruned(shape, block, sparsity, seed=0):
  """A random array whose zeros are whole ``block`` blocks (edge blocks clipped)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  grid = [-(-d // b) for d, b in zip(shape, block)]
  keep = rng.random(grid) >= sparsity
  keep = np.repeat(np.repeat(keep, block[0], 0), block[1], 1)[: shape[0], : shape[1]]
  return np.where(keep, w, 0).astype(np.float32)


def u32(x):
  return np.asarray(x).view(np.uint32)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  k=st.integers(1, 40),
  n=st.integers(1, 40),
  bk=st.integers(1, 9),
  bn=st.integers(1, 9),
  sparsity=st.floats(0, 1),
  seed=st.integers(0, 99),
)
def test_block_round_trip_and_product(k, n, bk, bn, sparsity, seed):
  bk, bn = min(bk, k), min(bn, n)
  w = block_pruned((k, n), (bk, bn), sparsity, seed)
  w.flat[0] = -0.0 if w.flat[0] == 0 else w.flat[0]  # -0.0 is a stored bit pattern
  b = si.to_block(w, (bk, bn))
  np.testing.assert_array_equal(u32(b.todense()), u32(w))
  x = np.random.default_rng(seed).standard_normal((3, 2, k)).astype(np.float32)
  got = jax.jit(si.block_matmul)(jnp.asarray(x), b)
  np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-5, atol=1e-5)
  # Stores exactly the blocks holding a nonzero bit.
  grid = [-(-d // s) for d, s in zip(w.shape, (bk, bn))]
  padded = np.zeros([g * s for g, s in zip(grid, (bk, bn))], bool)
  padded[:k, :n] = u32(w) != 0
  assert b.values.shape[0] == padded.reshape(grid[0], bk, grid[1], bn).any((1, 3)).sum()


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  k=st.integers(1, 40), n=st.integers(1, 40), sparsity=st.floats(0, 1), seed=st.integers(0, 99)
)
def test_ell_round_trip_and_product(k, n, sparsity, seed):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[rng.random((k, n)) < sparsity] = 0.0
  w.flat[-1] = -0.0 if w.flat[-1] == 0 else w.flat[-1]
  e = si.to_ell(w)
  np.testing.assert_array_equal(u32(jax.jit(lambda e: e.todense())(e)), u32(w))
  assert int(e.counts.sum()) == int((u32(w) != 0).sum())
  x = rng.standard_normal((4, k)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(jax.jit(si.ell_matmul)(jnp.asarray(x), e)), x @ w, rtol=1e-5, atol=1e-5
  )


def test_block_size_is_density_of_dense_bytes():
  w = block_pruned((256, 256), (16, 16), 0.9)
  b = si.to_block(w, (16, 16))
  blocks = b.values.shape[0]
  assert b.nbytes == blocks * 16 * 16 * 4 + 2 * blocks * 4  # values + two int32 per block
  assert b.nbytes / w.nbytes == pytest.approx(blocks / 256 * (1 + 2 / 256))


def test_choose_format():
  rng = np.random.default_rng(0)
  assert si.choose_format(block_pruned((128, 64), (16, 16), 0.9)) == (
    'block',
    {'block_shape': (16, 16)},
  )
  assert si.choose_format(block_pruned((128, 64), (32, 32), 0.9))[1] == {'block_shape': (32, 32)}
  w = rng.standard_normal((64, 64)).astype(np.float32)
  nm = np.asarray(jnp.where(prunax.selection.n_by_m_mask(jnp.abs(w), 2, 4), w, 0))
  assert si.choose_format(nm) == ('nm', {'n': 2, 'm': 4, 'axis': -1})
  unstructured = np.where(rng.random(w.shape) < 0.9, 0, w)
  assert si.choose_format(unstructured) == ('ell', {})
  assert si.choose_format(w) == ('dense', {})
  with pytest.raises(ValueError, match=r'2-D array, got shape \(4,\)'):
    si.choose_format(np.ones(4))
  with pytest.raises(ValueError, match='two positive ints'):
    si.to_block(w, (0, 4))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(96)(x))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(16)(x)


def test_block_pruned_model_exports_to_block_and_matches_masked_model(monkeypatch):
  """The real path: prunax.Block pruning -> export('auto') -> sparse_apply (block products)."""
  model = MLP()
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
  params = model.init(jax.random.PRNGKey(0), x)
  pruner = prunax.MagnitudePruning(sparsity=0.75, sparsity_type=prunax.Block((16, 16)))
  pruned, _ = jax.jit(pruner.instant_sparsify)(params)
  exported = export.export_params(pruned, 'auto')
  for layer in exported['params'].values():
    assert isinstance(layer['kernel'], si.BlockSparse)
    assert layer['kernel'].block_shape == (16, 16)
  for a, b in zip(jax.tree.leaves(export.densify(exported)), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(u32(a), u32(b))
  want = model.apply(pruned, x)
  calls = []
  real = si.block_matmul
  monkeypatch.setattr(si, 'block_matmul', lambda *a: calls.append(1) or real(*a))
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(exported, x)
  assert len(calls) == 3  # every block kernel ran as a block product
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fmt', ['block', 'ell', 'auto'])
def test_formats_save_load_and_sparse_apply(tmp_path, fmt):
  model = MLP()
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 64))
  params = model.init(jax.random.PRNGKey(0), x)
  pruned, _ = jax.jit(prunax.MagnitudePruning(sparsity=0.9).instant_sparsify)(params)
  exported = export.export_params(pruned, fmt, block_shape=(8, 8))
  export.save(tmp_path / 'm.npz', exported)
  loaded = export.load(tmp_path / 'm.npz')
  assert export.nbytes(loaded) == export.nbytes(exported)
  for a, b in zip(jax.tree.leaves(export.densify(loaded)), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(u32(a), u32(b))
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(loaded, x)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(model.apply(pruned, x)), rtol=1e-5, atol=1e-5
  )


class TinyLM(nn.Module):
  """An embedding table, a norm and an MLP: 2-D leaves that no Dense reads, and kernels."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.LayerNorm()(nn.Embed(64, 32)(tokens))
    return nn.Dense(64)(nn.relu(nn.Dense(128)(h)))


class ScannedMLP(nn.Module):
  """Three MLP blocks as one nn.scan: stacked kernels and stacked (2-D) norm scales, their
  layer axis at ``axis``."""

  axis: int = 0

  @nn.compact
  def __call__(self, x):
    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        h = nn.relu(nn.Dense(64)(nn.LayerNorm()(x)))
        return x + nn.Dense(32)(h), None

    scan = nn.scan(Step, variable_axes={'params': self.axis}, split_rngs={'params': True}, length=3)
    return nn.Dense(8)(scan()(x, None)[0])


@pytest.mark.parametrize('fmt', ['bcoo', 'block', 'ell', 'auto'])
@pytest.mark.parametrize('name', ['embedding', 'scanned'])
def test_only_the_kernels_layers_read_stay_sparse(monkeypatch, fmt, name):
  # Every 2-D sparse leaf stayed sparse: an nn.Embed table or a norm scale stacked by a
  # scan reached its layer as a sparse object, and the apply failed (flax's
  # ScopeParamShapeError). They are densified now; the kernels Dense reads whole stay
  # sparse, and a scan's stacked kernels (read a layer at a time) are densified.
  if name == 'embedding':
    model, x, sparse_kernels = TinyLM(), jnp.arange(10).reshape(2, 5) % 64, 2
  else:
    model, x, sparse_kernels = ScannedMLP(), jax.random.normal(jax.random.PRNGKey(1), (4, 32)), 1
  params = model.init(jax.random.PRNGKey(0), x)
  pruned, _ = jax.jit(prunax.MagnitudePruning(sparsity=0.9).instant_sparsify)(params)
  exported = export.export_params(pruned, fmt, block_shape=(8, 8))
  calls = []
  real = export.sparse_matmul
  monkeypatch.setattr(export, 'sparse_matmul', lambda *a: calls.append(1) or real(*a))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(exported, x)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(model.apply(pruned, x)), rtol=1e-5, atol=1e-5
  )
  assert len(calls) == sparse_kernels
  # Exported without layer axes, the scan's kernels run dense: the user is told which.
  stacks = ['params/ScanStep_0/Dense_0/kernel', 'params/ScanStep_0/Dense_1/kernel']
  whole = [str(w.message) for w in caught if 'exported whole' in str(w.message)]
  if name == 'scanned':
    assert len(whole) == 1 and whole[0].startswith(f'sparse_apply: {stacks} are read')
  else:
    assert whole == []


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  rank=st.integers(1, 2),
  window=st.integers(1, 3),
  stride=st.integers(1, 3),
  padding=st.sampled_from(['SAME', 'VALID', 'explicit']),
  lhs_dilation=st.integers(1, 2),
  rhs_dilation=st.integers(1, 2),
  seed=st.integers(0, 99),
)
def test_conv_patches_times_the_filter_matrix_is_the_convolution(
  rank, window, stride, padding, lhs_dilation, rhs_dilation, seed
):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2,) + (7,) * rank + (3,)).astype(np.float32)
  w = rng.standard_normal((window,) * rank + (3, 5)).astype(np.float32)
  # String padding with lhs dilation is refused by lax (and by conv_patches).
  pads = [(1, 2)] * rank if padding == 'explicit' or lhs_dilation > 1 else padding
  args = ((stride,) * rank, pads, (lhs_dilation,) * rank, (rhs_dilation,) * rank)
  spatial = 'HW'[:rank] if rank == 2 else 'W'
  want = jax.lax.conv_general_dilated(
    x,
    w,
    *args,
    dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
    precision='highest',
  )
  patches = si.conv_patches(jnp.asarray(x), (window,) * rank, *args)
  got = jnp.matmul(patches, w.reshape(-1, 5), precision='highest')
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  pruned = block_pruned(w.reshape(-1, 5).shape, (3, 1), 0.5, seed).reshape(w.shape)
  sparse = si.to_conv_filter(pruned, 'block', (3, 1))
  dense = sparse.todense()
  np.testing.assert_array_equal(u32(dense), u32(pruned))
  np.testing.assert_allclose(
    si.conv_matmul(jnp.asarray(x), sparse, *args),
    jax.lax.conv_general_dilated(
      x,
      dense,
      *args,
      dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
      precision='highest',
    ),
    rtol=1e-4,
    atol=1e-4,
  )


class CNN(nn.Module):
  padding: str = 'SAME'

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding=self.padding)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.Dense(32)(x)  # a Dense on the channel axis of a 4-D input
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _block_prune_filters(params, sparsity):
  """Conv filters whose (window * in, out) matrix has whole 16x16 blocks pruned."""

  def prune(path, x):
    if x.ndim != 4:
      return x
    matrix = np.asarray(x).reshape(-1, x.shape[-1])
    keep = block_pruned(matrix.shape, (16, 16), sparsity, seed=len(path)) != 0
    return jnp.asarray(np.where(keep, matrix, 0).reshape(x.shape))

  return jax.tree_util.tree_map_with_path(prune, params)


def test_block_pruned_conv_filters_run_as_sparse_convolutions(tmp_path, monkeypatch):
  model = CNN()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  pruned = _block_prune_filters(model.init(jax.random.PRNGKey(0), x), 0.9)
  exported = export.export_params(pruned, 'auto')
  for name in ('Conv_0', 'Conv_1'):
    kernel = exported['params'][name]['kernel']
    assert isinstance(kernel, si.ConvFilter) and isinstance(kernel.matrix, si.BlockSparse)
    assert kernel.matrix.block_shape == (16, 16)
  export.save(tmp_path / 'cnn.npz', exported)
  loaded = export.load(tmp_path / 'cnn.npz')
  assert export.nbytes(loaded) == export.nbytes(exported)
  for name in ('Conv_0', 'Conv_1'):  # about 10% of the blocks, plus two int32 per block
    stored, dense = exported['params'][name]['kernel'], pruned['params'][name]['kernel']
    assert stored.nbytes < 0.15 * dense.nbytes
  for a, b in zip(jax.tree.leaves(export.densify(loaded)), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(u32(a), u32(b))
  calls = []
  real = si.conv_matmul
  monkeypatch.setattr(si, 'conv_matmul', lambda *a: calls.append(1) or real(*a))
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(loaded, x)
  assert len(calls) == 2  # both convolutions ran on their block-sparse filters
  np.testing.assert_allclose(got, model.apply(pruned, x), rtol=1e-4, atol=1e-4)


def test_conv_filter_used_by_another_layer_is_densified_and_unsupported_conv_is_named():
  model = CNN()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  pruned = _block_prune_filters(model.init(jax.random.PRNGKey(0), x), 0.75)
  circular = CNN(padding='CIRCULAR')
  exported = export.export_params(pruned, 'block')
  with pytest.raises(ValueError, match=r"Conv_0 .*padding='CIRCULAR'"):
    export.sparse_apply(circular, exported, x)
  # A (window, in, out)-shaped leaf that a Dense-like layer reads is densified.
  einsum = nn.Einsum((3, 16, 16), 'bhwc,kcd->bhwkd', use_bias=False)
  p = {'params': {'kernel': jnp.asarray(block_pruned((48, 16), (16, 16), 0.5).reshape(3, 16, 16))}}
  wrapped = export.export_params(p, 'block')
  assert isinstance(wrapped['params']['kernel'], si.ConvFilter)
  np.testing.assert_allclose(export.sparse_apply(einsum, wrapped, x), einsum.apply(p, x), rtol=1e-5)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
  layers=st.integers(1, 4),
  k=st.integers(1, 24),
  n=st.integers(1, 24),
  axis=st.sampled_from([0, 1, -3]),
  fmt=st.sampled_from(['block', 'ell']),
  seed=st.integers(0, 99),
)
def test_stacked_layers_hold_each_layer_as_its_own_layout(layers, k, n, axis, fmt, seed):
  # Layers of different densities (so all but the fullest are padded), layer axis 0 or 1.
  rng = np.random.default_rng(seed)
  block = (min(4, k), min(3, n))
  per = [block_pruned((k, n), block, s, seed + i) for i, s in enumerate([0.2, 0.9, 1.0, 0.6])]
  per = per[:layers]
  per[0].flat[0] = -0.0 if per[0].flat[0] == 0 else per[0].flat[0]
  x = np.stack(per, axis=axis)
  stack = si.stack_layers(x, fmt, axis, block_shape=block)
  assert stack.stacked and stack.shape == x.shape and stack.layer_shape == (k, n)
  assert stack.nbytes == sum(a.nbytes for a in jax.tree.leaves(stack))
  np.testing.assert_array_equal(u32(jax.jit(lambda s: s.todense())(stack)), u32(x))
  inputs = rng.standard_normal((2, k)).astype(np.float32)
  product = si.block_matmul if fmt == 'block' else si.ell_matmul
  with pytest.raises(ValueError, match=f'holds {layers} layers along axis {axis % 3}'):
    product(jnp.asarray(inputs), stack)
  for i, w in enumerate(per):
    # What a scan over the layer axis hands its body: every array sliced at that axis.
    layer = jax.tree.map(lambda a, i=i: jnp.take(a, i, axis=axis % 3), stack)
    assert not layer.stacked and layer.shape == (k, n)
    np.testing.assert_array_equal(u32(layer.todense()), u32(w))
    got = jax.jit(product)(jnp.asarray(inputs), layer)
    np.testing.assert_allclose(np.asarray(got), inputs @ w, rtol=1e-5, atol=1e-5)
  if fmt == 'block':  # each layer stores its own occupied blocks, then padding
    own = [si.to_block(w, block).values.shape[0] for w in per]
    assert stack.block_count == max(own)


def test_stack_layers_rejects_what_it_cannot_hold():
  with pytest.raises(ValueError, match=r'layer_axis must be 0 or 1 .* got 2 for shape \(4, 4, 3\)'):
    si.stack_layers(np.ones((4, 4, 3)), 'block', 2)
  with pytest.raises(ValueError, match=r'3-D stack .* got shape \(2, 4, 4, 3\)'):
    si.stack_layers(np.ones((2, 4, 4, 3)), 'ell', 0)
  with pytest.raises(ValueError, match="fmt must be 'block' or 'ell', got 'bcoo'"):
    si.stack_layers(np.ones((2, 4, 3)), 'bcoo', 0)


@pytest.mark.parametrize('fmt', ['block', 'ell', 'auto'])
@pytest.mark.parametrize('axis', [0, 1])
def test_scanned_kernels_run_sparse_inside_the_scan(tmp_path, monkeypatch, fmt, axis):
  # Before, a scan's stacked kernels were exported whole and densified inside the apply
  # (the scan reads a layer at a time). Exported with layer_axes, each is one layout that
  # the scan slices: every layer's product runs sparse, and the outputs are the model's.
  model = ScannedMLP(axis)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  params = model.init(jax.random.PRNGKey(0), x)
  axes = {'params/ScanStep_0/Dense_.*/kernel': axis}
  pruner = prunax.MagnitudePruning(
    sparsity_distribution_fn={'.*kernel': 0.75}, sparsity_type=prunax.Block((8, 8)), layer_axes=axes
  )
  pruned, _ = jax.jit(pruner.instant_sparsify)(params)
  exported = export.export_params(pruned, fmt, block_shape=(8, 8), layer_axes=axes)
  stacked = exported['params']['ScanStep_0']
  for name, shape in (('Dense_0', (32, 64)), ('Dense_1', (64, 32))):
    kernel = stacked[name]['kernel']
    assert isinstance(kernel, si.BlockSparse if fmt != 'ell' else si.EllSparse)
    assert kernel.stacked and kernel.layer_axis == axis and kernel.layer_shape == shape
  export.save(tmp_path / 'm.npz', exported)
  loaded = export.load(tmp_path / 'm.npz')
  for a, b in zip(jax.tree.leaves(export.densify(loaded)), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(u32(a), u32(b))
  seen = []
  real = export.sparse_matmul
  monkeypatch.setattr(export, 'sparse_matmul', lambda *a: seen.append(a[1].shape) or real(*a))
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(loaded, x)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(model.apply(pruned, x)), rtol=1e-5, atol=1e-5
  )
  assert set(seen) == {(32, 64), (64, 32), (32, 8)}  # both scanned kernels and the head


class NnxNet(nnx.Module):
  """An embedding (densified), Linear layers with and without bias, a 1-D convolution."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 32, rngs=rngs)
    self.a = nnx.Linear(32, 64, rngs=rngs)
    self.b = nnx.Linear(64, 32, use_bias=False, rngs=rngs)
    self.c = nnx.Conv(32, 16, (3,), rngs=rngs)

  def __call__(self, tokens):
    return self.c(self.b(jax.nn.relu(self.a(self.embed(tokens)))))


@pytest.mark.parametrize('fmt', ['bcoo', 'block', 'ell', 'auto'])
def test_nnx_module_runs_its_sparse_kernels(monkeypatch, fmt):
  # sparse_apply intercepts linen layers only: an nnx model had no sparse inference.
  graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
  pruned, _ = jax.jit(prunax.MagnitudePruning(sparsity=0.9).instant_sparsify)(state)
  exported = export.export_params(pruned, fmt, block_shape=(8, 8))
  tokens = jnp.arange(12).reshape(2, 6)
  want = nnx.merge(graphdef, pruned)(tokens)
  seen, convs = [], []
  real, real_conv = export.sparse_matmul, si.conv_matmul
  monkeypatch.setattr(export, 'sparse_matmul', lambda *a: seen.append(a[1].shape) or real(*a))
  monkeypatch.setattr(si, 'conv_matmul', lambda *a: convs.append(1) or real_conv(*a))
  model = export.nnx_sparse(graphdef, exported)
  assert isinstance(model.embed.embedding.get_value(), jax.Array)  # densified, once
  np.testing.assert_allclose(model(tokens), want, rtol=1e-5, atol=1e-5)
  assert seen == [(32, 64), (64, 32)]
  assert len(convs) == (0 if fmt == 'bcoo' else 1)  # BCOO filters run dense
  # Split and merged again under jit, it still runs sparse.
  small_graph, small_state = nnx.split(model)
  got = jax.jit(lambda s, t: nnx.merge(small_graph, s)(t))(small_state, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert seen[2:] == [(32, 64), (64, 32)]


def test_nnx_scan_runs_each_layer_sparse(monkeypatch):
  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(16, 48, rngs=rngs), nnx.Linear(48, 16, rngs=rngs)

    def __call__(self, x):
      return x + self.b(jax.nn.relu(self.a(x)))

  graphdef, state = nnx.split(nnx_scanned_stack(Layer, nnx.Rngs(0)))
  axes = {'layers/[ab]/kernel': 0}
  pruner = prunax.MagnitudePruning(
    sparsity_distribution_fn={'layers/[ab]/kernel': 0.75},
    sparsity_type=prunax.Block((8, 8)),
    layer_axes=axes,
  )
  pruned, _ = jax.jit(pruner.instant_sparsify)(state)
  exported = export.export_params(pruned, 'block', block_shape=(8, 8), layer_axes=axes)
  assert exported['layers']['a']['kernel'].get_value().stacked
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  seen = []
  real = export.sparse_matmul
  monkeypatch.setattr(export, 'sparse_matmul', lambda *a: seen.append(a[1].shape) or real(*a))
  got = export.nnx_sparse(graphdef, exported)(x)
  np.testing.assert_allclose(got, nnx.merge(graphdef, pruned)(x), rtol=1e-5, atol=1e-5)
  assert seen == [(16, 48), (48, 16), (16, 4)]  # each layer's own layout, inside the scan


class MixedPrecisionScan(nn.Module):
  """bf16 computation over float32 params (as t5x and MaxText run), in an nn.scan whose
  carry is bf16."""

  @nn.compact
  def __call__(self, x):
    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        h = nn.relu(nn.Dense(64, dtype=jnp.bfloat16)(x))
        return x + nn.Dense(32, dtype=jnp.bfloat16)(h), None

    scan = nn.scan(Step, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    return nn.Dense(8, dtype=jnp.bfloat16)(scan()(x, None)[0])


@pytest.mark.parametrize('fmt', ['bcoo', 'block', 'ell'])
def test_mixed_precision_layers_keep_their_dtype(fmt):
  # The sparse products ran in the kernel's dtype (float32) where the layer computes in
  # bf16: a float32 output, and inside a scan a carry that changed dtype (lax.scan
  # refuses it). They compute in the layer's dtype now, as flax's promote_dtype does.
  model = MixedPrecisionScan()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32)).astype(jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), x)
  axes = {'.*ScanStep.*/kernel': 0}
  pruner = prunax.MagnitudePruning(sparsity_distribution_fn={'.*kernel': 0.75}, layer_axes=axes)
  pruned, _ = jax.jit(pruner.instant_sparsify)(params)
  exported = export.export_params(pruned, fmt, block_shape=(8, 8), layer_axes=axes)
  want = model.apply(pruned, x)
  with warnings.catch_warnings():  # a BCOO stack is exported whole and runs dense
    warnings.filterwarnings('ignore', 'sparse_apply: .* exported whole')
    got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(exported, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05
  )
  # nnx: a Linear computing in bf16 over float32 params.
  graphdef, state = nnx.split(nnx.Linear(32, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  state, _ = jax.jit(prunax.MagnitudePruning(sparsity=0.75).instant_sparsify)(state)
  layer = export.nnx_sparse(graphdef, export.export_params(state, fmt, block_shape=(8, 8)))
  assert layer(x).dtype == nnx.merge(graphdef, state)(x).dtype == jnp.bfloat16


def test_boxed_scanned_kernels_run_sparse(monkeypatch):
  # The layer axes come from the boxes. Before, sparse_apply named the boxed leaves
  # '.../kernel/.value' and read the layers' kernels as boxes, so none matched and the
  # stack ran dense.
  model, x = BoxedScan(), jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  variables = model.init(jax.random.PRNGKey(0), x)
  pruner = prunax.MagnitudePruning(
    sparsity_distribution_fn={'.*ScanStep.*kernel': 0.75}, sparsity_type=prunax.Block((8, 8))
  )
  pruned, _ = jax.jit(pruner.instant_sparsify)(variables)
  exported = export.export_params(pruned, 'block', block_shape=(8, 8))
  assert exported['params']['ScanStep_0']['Dense_0']['kernel'].unbox().stacked
  seen = []
  real = export.sparse_matmul
  monkeypatch.setattr(export, 'sparse_matmul', lambda *a: seen.append(a[1].shape) or real(*a))
  got = jax.jit(lambda p, x: export.sparse_apply(model, p, x))(exported, x)
  np.testing.assert_allclose(got, model.apply(pruned, x), rtol=1e-5, atol=1e-5)
  assert set(seen) == {(32, 64), (64, 32), (32, 8)}

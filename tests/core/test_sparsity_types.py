"""Exact counts and tie-breaking of every sparsity structure, and their bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import sparsity_types
from tests.core.helpers import loops_in


def expected_zeros(sparsity, size):
  # round(s * n) on float32, but a pruned leaf keeps at least one element.
  return min(int(np.round(np.float32(sparsity) * np.float32(size))), max(size - 1, 0))


@pytest.mark.parametrize('shape', [(7,), (10, 13), (3, 5, 7), (64, 128)])
@pytest.mark.parametrize('sparsity', [0.0, 0.1, 0.5, 0.77, 0.95])
def test_unstructured_exact_count_and_largest_kept(shape, sparsity):
  scores = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)
  # Jitted, the sparsity a constant: one compile, not one per eager operation.
  mask = np.asarray(jax.jit(lambda x: prunax.Unstructured().mask(x, sparsity))(scores))
  size = math.prod(shape)
  assert mask.dtype == bool and mask.shape == shape
  assert size - mask.sum() == expected_zeros(sparsity, size)
  kept, dropped = np.asarray(scores)[mask], np.asarray(scores)[~mask]
  if kept.size and dropped.size:
    assert kept.min() >= dropped.max()


def test_unstructured_traced_sparsity_matches_static():
  scores = jax.random.uniform(jax.random.PRNGKey(0), (33, 17))
  static = prunax.Unstructured().mask(scores, 0.6)
  traced = jax.jit(lambda s: prunax.Unstructured().mask(scores, s))(jnp.float32(0.6))
  np.testing.assert_array_equal(static, traced)


def test_all_equal_scores_keep_lowest_indices():
  mask = np.asarray(prunax.Unstructured().mask(jnp.ones((4, 5)), 0.45))
  # 9 zeros: the 11 kept are the first 11 in row-major order.
  np.testing.assert_array_equal(mask.reshape(-1), np.arange(20) < 11)


def test_ties_at_threshold_broken_by_index():
  scores = jnp.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
  mask = np.asarray(prunax.Unstructured().mask(scores, 3 / 7))  # keep 4
  np.testing.assert_array_equal(mask, [True, False, True, True, True, False, False])


def test_negative_zero_and_inf_scores_order():
  scores = jnp.array([-jnp.inf, -1.0, -0.0, 0.0, 1e-30, jnp.inf])
  for keep in range(7):
    mask = np.asarray(prunax.selection.topk_mask(scores, keep))
    # -0.0 ranks just below +0.0; the kept entries are always the last ones.
    np.testing.assert_array_equal(mask, np.arange(6) >= 6 - keep)


def test_global_topk_shares_one_threshold():
  a = jnp.array([[5.0, 1.0], [4.0, 0.5]])
  b = jnp.array([3.0, 2.0, 6.0])
  ma, mb = prunax.selection.global_topk_masks([a, b], 4)
  np.testing.assert_array_equal(ma, [[True, False], [True, False]])
  np.testing.assert_array_equal(mb, [True, False, True])


def _nm_reference(scores, n, m, axis):
  moved = np.moveaxis(np.asarray(scores), axis, -1)
  groups = moved.reshape(-1, m)
  keep = np.zeros_like(groups, bool)
  for g, row in enumerate(groups):
    order = sorted(range(m), key=lambda i: (-row[i], i))  # stable: lower index first
    keep[g, order[:n]] = True
  return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@pytest.mark.parametrize(
  'n,m,axis,shape',
  [(2, 4, -1, (6, 8)), (1, 4, 0, (8, 3)), (3, 8, 1, (2, 16, 3)), (4, 4, -1, (3, 4))],
)
def test_n_by_m_exact_per_group(n, m, axis, shape):
  # Few distinct values, so groups contain ties.
  scores = jnp.round(jax.random.uniform(jax.random.PRNGKey(n + m), shape) * 3)
  mask = np.asarray(prunax.NByM(n, m, axis).mask(scores, 0.5))
  np.testing.assert_array_equal(mask, _nm_reference(scores, n, m, axis))
  per_group = np.moveaxis(mask, axis, -1).reshape(-1, m).sum(-1)
  assert (per_group == n).all()


def test_n_by_m_off_before_pruning_starts():
  mask = prunax.NByM(2, 4).mask(jnp.arange(8.0), 0.0)
  assert bool(mask.all())


def _block_reference(scores, block, sparsity, avg):
  scores = np.asarray(scores, np.float64)
  block = (1,) * (scores.ndim - len(block)) + tuple(block)
  nblocks = [-(-d // b) for d, b in zip(scores.shape, block)]
  pooled = np.zeros(nblocks)
  for idx in np.ndindex(*nblocks):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
    pooled[idx] = scores[sl].mean() if avg else scores[sl].max()
  flat = pooled.reshape(-1)
  n_keep = flat.size - expected_zeros(sparsity, flat.size)
  order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
  keep_blocks = np.zeros(flat.size, bool)
  keep_blocks[order[:n_keep]] = True
  keep_blocks = keep_blocks.reshape(nblocks)
  mask = np.zeros(scores.shape, bool)
  for idx in np.ndindex(*nblocks):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
    mask[sl] = keep_blocks[idx]
  return mask, keep_blocks


@pytest.mark.parametrize(
  'shape,block',
  [((10,), (4,)), ((8, 8), (2, 4)), ((7, 10), (3, 4)), ((5, 6, 7), (2, 3)), ((4, 6, 9), (2, 3, 4))],
)
@pytest.mark.parametrize('avg', [True, False])
def test_block_pooling_matches_reference(shape, block, avg):
  scores = jax.random.uniform(jax.random.PRNGKey(len(shape)), shape)
  structure = prunax.Block(block, use_avg_pooling=avg)
  structure.validate(shape, 'w')
  mask = np.asarray(jax.jit(lambda x: structure.mask(x, 0.5))(scores))
  expected, keep_blocks = _block_reference(scores, block, 0.5, avg)
  np.testing.assert_array_equal(mask, expected)
  assert keep_blocks.size - keep_blocks.sum() == expected_zeros(0.5, keep_blocks.size)


@pytest.mark.parametrize('axis', [0, 1, -1])
def test_channel_exact_count(axis):
  scores = jax.random.uniform(jax.random.PRNGKey(3), (6, 10, 5))
  mask = np.asarray(prunax.Channel(axis).mask(scores, 0.4))
  size = scores.shape[axis]
  per_channel = np.moveaxis(mask, axis, 0).reshape(size, -1)
  assert (per_channel.all(1) | ~per_channel.any(1)).all()  # whole channels
  assert size - per_channel.all(1).sum() == expected_zeros(0.4, size)
  means = np.moveaxis(np.asarray(scores), axis, 0).reshape(size, -1).mean(1)
  kept = per_channel.all(1)
  assert means[kept].min() >= means[~kept].max()


@pytest.mark.parametrize(
  'spec,expected',
  [
    ('unstructured', prunax.Unstructured()),
    ('nm_2,4', prunax.NByM(2, 4)),
    ('block_4,4', prunax.Block((4, 4))),
    ('channel_0', prunax.Channel(0)),
    ('channel_-1', prunax.Channel(-1)),
    ('block_8', prunax.Block((8,))),
  ],
)
def test_from_string(spec, expected):
  assert sparsity_types.from_string(spec) == expected


@pytest.mark.parametrize(
  'make,match',
  [
    (lambda: prunax.NByM(5, 4), r'NByM\(5, 4\): n must be an integer in \[1, 4\], got 5'),
    (lambda: prunax.NByM(-1, 4), r'got -1'),
    (lambda: prunax.NByM(1, 0), r'm must be an integer >= 1, got 0'),
    (lambda: prunax.Block((0, 2)), r'block_shape must be positive'),
    (lambda: sparsity_types.from_string('nm_2-4'), r"Unknown sparsity type 'nm_2-4'"),
    (lambda: sparsity_types.from_string('blocks'), r'valid forms'),
  ],
)
def test_bad_structures(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_validate_errors_name_the_parameter():
  with pytest.raises(ValueError, match=r"axis -1 of parameter 'w' with shape \(4, 6\) has size 6"):
    prunax.NByM(2, 4, axis=-1).validate((4, 6), 'w')
  with pytest.raises(ValueError, match=r"axis -2 of parameter 'w' with shape \(6, 4\) has size 6"):
    prunax.NByM(2, 4).validate((6, 4), 'w')
  with pytest.raises(ValueError, match=r"larger than parameter 'w'"):
    prunax.Block((8, 2)).validate((4, 6), 'w')
  # A block with more dimensions than the leaf takes its trailing dimensions (jaxpruner's
  # rule); a 0-d leaf has none to take and cannot be pruned at all.
  prunax.Block((2, 2, 2)).validate((4, 6), 'w')
  with pytest.raises(ValueError, match=r"'w' has shape \(\): a scalar"):
    prunax.Block((2, 2, 2)).validate((), 'w')
  with pytest.raises(ValueError, match=r'axis 3 is out of range'):
    prunax.Channel(3).validate((4, 6), 'w')


@pytest.mark.parametrize('leaves', [2, 5])
@pytest.mark.parametrize(
  'structure, shape',
  [
    (prunax.Block((2, 2), use_avg_pooling=True), (96, 64)),  # 1536 blocks: searched
    (prunax.Channel(-1), (3, 1280)),  # 1280 channels: searched
  ],
  ids=['block', 'channel'],
)
def test_structured_masks_of_many_leaves_are_one_selection(structure, shape, leaves):
  # The blocks or channels of every leaf are selected by one loop (its tie-break
  # included),
  # each leaf at its own count, with the masks of mask() one leaf at a time.
  keys = jax.random.split(jax.random.PRNGKey(7), leaves)
  scores = [jax.random.uniform(k, shape) for k in keys]
  sparsities = [0.3 + 0.1 * i for i in range(leaves)]
  select = lambda xs: structure.masks(xs, sparsities, [None] * leaves)  # noqa: E731
  assert loops_in(jax.make_jaxpr(select)(scores).jaxpr) == 1
  masks = jax.jit(select)(scores)
  for x, s, m in zip(scores, sparsities, masks, strict=True):
    if isinstance(structure, prunax.Block):
      expected, _ = _block_reference(x, structure.block_shape, s, True)
    else:
      means = np.asarray(x).mean(0)
      keep = np.zeros(means.size, bool)
      keep[
        sorted(range(means.size), key=lambda i: (-means[i], i))[
          : means.size - expected_zeros(s, means.size)
        ]
      ] = True
      expected = np.broadcast_to(keep, shape)
    np.testing.assert_array_equal(np.asarray(m), expected)

"""Exactness of prunax.selection against a stable sort (ties kept by lowest flat index).

The exactness tests run twice (``selection_path``): every selection made by the search
loops, then every selection made by sorting (the path of small arrays)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunax import selection
from tests.xla_env import compile_as_users


def reference_keys(a) -> np.ndarray:
  """:func:`selection.sortable_keys` transcribed to NumPy for float32 scores (other float
  dtypes are cast to float32, as jnp.asarray casts NumPy's float64): flip every bit of a
  negative float, set the sign bit of a non-negative one, and give NaN the key of
  -FLT_MAX. uint32 arrays are keys already; 16-bit floats get the library's 16-bit keys.
  """
  a = np.asarray(a)
  if a.dtype == np.uint32:
    return a
  if a.dtype in (jnp.bfloat16, np.float16):
    return np.asarray(_jitted_sortable_keys(a))
  bits = a.astype(np.float32).view(np.uint32)
  keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
  return np.where((bits & 0x7FFFFFFF) > 0x7F800000, np.uint32(0x00800000), keys)


_jitted_sortable_keys = jax.jit(selection.sortable_keys)


def reference_masks(arrays, k):
  """Top-k by a stable descending sort of the uint32 keys over the concatenated arrays."""
  keys = np.concatenate([reference_keys(a).reshape(-1) for a in arrays])
  order = np.lexsort((np.arange(keys.size), -keys.astype(np.int64)))
  keep = np.zeros(keys.size, bool)
  keep[order[:k]] = True
  masks, offset = [], 0
  for a in arrays:
    masks.append(keep[offset : offset + a.size].reshape(a.shape))
    offset += a.size
  return masks


def make_scores(kind, shape, rng):
  if kind == 'normal':
    a = rng.standard_normal(shape)
  elif kind == 'few_values':  # heavy ties everywhere
    a = rng.integers(-3, 3, shape).astype(float)
  elif kind == 'mostly_zero':  # pruned magnitudes: ties at 0
    a = np.where(rng.random(shape) < 0.8, 0.0, np.abs(rng.standard_normal(shape)))
  elif kind == 'special':
    a = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], shape)
  else:  # 'tiny': subnormal range
    a = np.abs(rng.standard_normal(shape)) * 1e-40
  return np.asarray(a, np.float32)


KINDS = ['normal', 'few_values', 'mostly_zero', 'special', 'tiny']


@pytest.mark.parametrize('kind', KINDS)
def test_global_topk_matches_stable_sort(kind, selection_path):
  rng = np.random.default_rng(KINDS.index(kind))
  fn = jax.jit(selection.global_topk_masks)
  for shapes in [[(7, 13), (5,), (3, 4, 6)], [(200, 3)]]:
    arrays = [make_scores(kind, s, rng) for s in shapes]
    n = sum(a.size for a in arrays)
    for k in sorted({0, 1, n - 1, n, n // 2, int(rng.integers(0, n + 1))}):
      got = fn([jnp.asarray(a) for a in arrays], k)
      for g, want in zip(got, reference_masks(arrays, max(k, 0))):
        np.testing.assert_array_equal(np.asarray(g), want, err_msg=f'{kind} {shapes} k={k}')


def test_topk_large_exact_count_and_ties_by_index():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(300_007).astype(np.float32)
  x[::3] = 0.5  # 100003 ties at one value straddling the threshold
  fn = jax.jit(selection.topk_mask)
  for k in [1, 1000, 150_000, 299_999]:
    got = np.asarray(fn(jnp.asarray(x), k))
    assert got.sum() == k
    np.testing.assert_array_equal(got, reference_masks([x], k)[0])


def test_traced_k_and_clipping(selection_path):
  x = jnp.arange(10.0)
  fn = jax.jit(selection.topk_mask)
  np.testing.assert_array_equal(np.asarray(fn(x, jnp.int32(3))), np.arange(10) >= 7)
  assert int(fn(x, jnp.int32(-5)).sum()) == 0
  assert int(fn(x, jnp.int32(50)).sum()) == 10


def test_score_fn_equals_materialized_scores(selection_path):
  rng = np.random.default_rng(1)
  arrays = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in [(40, 30), (77,)]]
  lazy = jax.jit(lambda xs: selection.global_topk_masks(xs, 500, score_fn=jnp.abs))(arrays)
  eager = jax.jit(lambda xs: selection.global_topk_masks([jnp.abs(a) for a in xs], 500))(arrays)
  for a, b in zip(lazy, eager):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sortable_keys_order():
  values = np.array([-np.inf, -2.0, -1e-40, -0.0, 0.0, 1e-40, 3.0, np.inf], np.float32)
  keys = np.asarray(selection.sortable_keys(jnp.asarray(values))).astype(np.int64)
  assert np.all(np.diff(keys) > 0)
  # NaN (either sign) ranks above -inf (the algorithms' "never pick") and below every other
  # finite score except -FLT_MAX, which it ties.
  nans = jnp.asarray([np.nan, -np.abs(np.float32(np.nan))], jnp.float32)
  nan_keys = np.asarray(selection.sortable_keys(nans)).astype(np.int64)
  lowest = np.asarray(selection.sortable_keys(jnp.asarray([np.finfo(np.float32).min])))[0]
  assert np.all(nan_keys > keys[0]) and np.all(nan_keys == lowest) and np.all(nan_keys < keys[1])


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 2**32 - 1), min_size=64, max_size=64))
def test_reference_keys_are_the_library_s(bits):
  # The tests' NumPy keys (reference_masks) against sortable_keys, on any float32 bits:
  # NaNs of either sign and payload, infinities, subnormals and both zeros included.
  values = np.asarray(bits, np.uint32).view(np.float32)
  values[:4] = [np.nan, -np.inf, -0.0, 0.0]
  np.testing.assert_array_equal(reference_keys(values), np.asarray(_jitted_sortable_keys(values)))


def test_nan_scores_are_never_kept_ahead_of_finite_ones(selection_path):
  x = jnp.asarray([np.nan, 1.0, np.nan, -5.0, 2.0, np.nan], jnp.float32)
  topk = jax.jit(selection.topk_mask)
  np.testing.assert_array_equal(
    np.asarray(topk(x, jnp.int32(3))), [False, True, False, True, True, False]
  )
  np.testing.assert_array_equal(
    np.asarray(topk(x, jnp.int32(4))), [True, True, False, True, True, False]
  )


@pytest.mark.parametrize('n,m,axis', [(2, 4, -1), (1, 4, 0), (3, 8, 1)])
def test_n_by_m_exact_per_group(n, m, axis):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 3, (8, 16)).astype(np.float32)  # many ties
  keep = np.asarray(selection.n_by_m_mask(jnp.asarray(x), n, m, axis))
  moved = np.moveaxis(keep, axis, -1).reshape(-1, m)
  assert np.all(moved.sum(-1) == n)
  groups = np.moveaxis(x, axis, -1).reshape(-1, m)
  for g, kg in zip(groups, moved):  # stable descending sort within the group
    want = np.zeros(m, bool)
    want[np.lexsort((np.arange(m), -g))[:n]] = True
    np.testing.assert_array_equal(kg, want)


def test_lazy_scores_equal_materialized_scores():
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  w = jax.random.normal(k[0], (37, 29))
  g = jax.random.normal(k[1], (37, 29))
  lazy = selection.Lazy(lambda a, b: jnp.abs(a * b), w, g)
  assert lazy.shape == (37, 29) and lazy.size == 37 * 29 and lazy.ndim == 2

  # One compiled computation (eagerly, every operation of the search compiles alone).
  @jax.jit
  def masks_and_references(w, g):
    lazy = selection.Lazy(lambda a, b: jnp.abs(a * b), w, g)
    pairs = [
      (selection.topk_mask(lazy, keep), selection.topk_mask(jnp.abs(w * g), keep))
      for keep in (1, 100, 500, 37 * 29)
    ]
    # Several lazy leaves share one threshold; a score_fn composes with the lazy function.
    masks = selection.global_topk_masks(
      [lazy, selection.Lazy(jnp.negative, w)], 300, score_fn=jnp.abs
    )
    ref = selection.global_topk_masks([jnp.abs(w * g), jnp.abs(w)], 300)
    return pairs, masks, ref

  pairs, masks, ref = masks_and_references(w, g)
  for got, want in pairs:
    np.testing.assert_array_equal(got, want)
  for a, b in zip(masks, ref):
    np.testing.assert_array_equal(a, b)
  assert sum(int(m.sum()) for m in masks) == 300


def test_nested_and_lazy_masks_equal_materialized_ones():
  # Lazy masks (lazy=True) compose into further scores: drop-and-grow, as SET/RigL do it.
  k = jax.random.split(jax.random.PRNGKey(5), 3)
  w = jax.random.normal(k[0], (64, 96))
  g = jax.random.normal(k[1], (64, 96))
  old = jax.random.uniform(k[2], (64, 96)) < 0.3

  def active(m, x):
    return jnp.where(m, jnp.abs(x), -jnp.inf)

  def inactive(m, x):
    return jnp.where(m, -jnp.inf, x)

  n_keep = int(old.sum()) - 100

  # One compiled computation (eagerly, every operation of the search compiles alone).
  @jax.jit
  def lazy_and_materialized(old, w, g):
    kept = selection.topk_mask(selection.Lazy(active, old, w), n_keep, lazy=True)
    grown = selection.topk_mask(
      selection.Lazy(inactive, kept, selection.Lazy(jnp.abs, g)), 100, lazy=True
    )
    new = selection.materialize(selection.Lazy(jnp.logical_or, kept, grown))
    want_kept = selection.topk_mask(active(old, w), n_keep)
    want_grown = selection.topk_mask(inactive(want_kept, jnp.abs(g)), 100)
    # The row view reads the same values as the full evaluation.
    lazy = selection.Lazy(inactive, kept, selection.Lazy(jnp.abs, g))
    views = (lazy().reshape(-1), lazy.rows().reshape(-1))
    return selection.materialize(kept), new, want_kept, want_grown, views

  kept, new, want_kept, want_grown, (full, rows) = lazy_and_materialized(old, w, g)
  np.testing.assert_array_equal(kept, want_kept)
  np.testing.assert_array_equal(new, want_kept | want_grown)
  assert int(new.sum()) == int(old.sum())
  np.testing.assert_array_equal(rows, full)
  np.testing.assert_array_equal(
    np.asarray(selection.Lazy(jnp.abs, g).strided_sample(7)), np.abs(np.asarray(g)).reshape(-1)[::7]
  )


def test_sample_stride_is_a_prime_dividing_no_dimension():
  stride = selection._sample_stride(2048 * 2048, [(2048, 2048)])
  assert stride >= 2048 * 2048 // selection._SAMPLE
  assert all(stride % f for f in range(2, int(stride**0.5) + 1))
  assert 2048 % stride
  # A stride dividing a dimension is skipped (2053 is prime and divides 2053 * 2).
  assert selection._sample_stride(2053 * 2048, [(2053 * 2, 1024)]) != 2053
  assert selection._sample_stride(100, [(10, 10)]) == 1
  # On a matrix whose first column is all zero (a dead unit), the sample still sees the
  # other columns, so the search finds the exact count from a good first guess.
  x = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048)).at[:, 0].set(0.0)
  mask = selection.topk_mask(jnp.abs(x), 125_829)
  assert int(mask.sum()) == 125_829


def test_selection_stores_no_full_size_array():
  # XLA would store loop-invariant keys (16 MB here) and reuse them in every pass; the
  # search makes them depend on the loop state. Of the counts, only the sums of blocks of
  # 32 rows of 32 keys are stored (83,080 bytes); the per-row counts were (525,448).
  w = jnp.zeros((2048, 2048))
  compiled = compile_as_users(
    jax.jit(lambda x: selection.topk_mask(selection.Lazy(jnp.abs, x), 400_000)).lower(w)
  )
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < w.nbytes // 64, temp


def test_hash_uniform_is_uniform_deterministic_and_keyed():
  like = jnp.zeros((256, 512))
  key = jnp.array([1, 2], jnp.uint32)
  u = np.asarray(selection.hash_uniform(like, key))
  assert u.shape == (256, 512) and u.dtype == np.float32
  assert u.min() >= 0.0 and u.max() < 1.0
  # Mean and decile counts of 131072 uniform draws (tolerances ~5 standard deviations).
  assert abs(u.mean() - 0.5) < 5 * (1 / np.sqrt(12 * u.size))
  counts = np.histogram(u, bins=10, range=(0, 1))[0]
  expected = u.size / 10
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
  # Neighbouring positions are not correlated.
  flat = u.reshape(-1)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.02
  np.testing.assert_array_equal(u, selection.hash_uniform(like, key))
  other = np.asarray(selection.hash_uniform(like, jnp.array([1, 3], jnp.uint32)))
  assert np.mean(u == other) < 0.01
  assert len(np.unique(u)) > 0.99 * u.size


@pytest.mark.parametrize('shape', [(256, 512), (3, 7, 64), (1,), (1000,)])
def test_hash_keys_are_distinct_uniform_deterministic_and_keyed(shape):
  like = jnp.zeros(shape)
  key = jnp.array([5, 9], jnp.uint32)
  h = np.asarray(selection.hash_keys(like, key))
  assert h.shape == shape and h.dtype == np.uint32
  # Pairwise distinct, in the upper half: above 0 (the key of positions that cannot
  # grow) and the lower half (selection.zeros_lowest).
  assert len(np.unique(h)) == h.size
  assert h.min() >= 2**31
  # The transcription of the formula: 2**31 + mix31(i * (k0 | 1) + k1), on 31 bits.
  low = np.uint64(2**31 - 1)

  def mix31(x):
    x = x & low
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & low
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & low
    return x ^ (x >> np.uint64(16))

  i = np.arange(h.size, dtype=np.uint64).reshape(shape)
  want = mix31(i * np.uint64(5 | 1) + np.uint64(9)) + np.uint64(2**31)
  np.testing.assert_array_equal(h, want.astype(np.uint32))
  np.testing.assert_array_equal(h, selection.hash_keys(like, key))
  if h.size >= 1000:
    u = (h.astype(np.float64) - 2**31) / 2**31  # uniform on [0, 1)
    assert abs(u.mean() - 0.5) < 5 * (1 / np.sqrt(12 * u.size))
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - u.size / 10) < 5 * np.sqrt(u.size / 10))
    other = np.asarray(selection.hash_keys(like, jnp.array([5, 10], jnp.uint32)))
    assert np.mean(h == other) < 0.01
    # The top tenth under two keys: as much overlap as two independent random choices.
    top = lambda k: set(np.argsort(-k.reshape(-1))[: k.size // 10].tolist())  # noqa: E731
    overlap = len(top(h) & top(other)) / (h.size // 10)
    assert abs(overlap - 0.1) < 0.05, overlap


def test_hash_keys_of_stacked_layers_are_distinct_within_each_layer():
  like = jnp.zeros((4, 64, 32))
  keys = jnp.array([[5, 9], [1, 2]], jnp.uint32)
  ids = jnp.arange(4, dtype=jnp.uint32).reshape(4, 1, 1)
  layers = selection.map_layers(
    lambda x, i: selection.hash_keys_layers_at(x, keys, 1, i), 0, like, ids
  )
  layers = np.asarray(layers)
  for layer in layers:
    assert len(np.unique(layer)) == layer.size and layer.min() >= 2**31
  assert np.mean(layers[0] == layers[1]) < 0.01  # an independent stream per layer


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(st.integers(0, 2**32 - 1))
def test_topk_masks_of_distinct_keys_skip_the_tie_break_and_equal_the_full_search(seed):
  # Keys distinct above 0, with 0 at positions that cannot be picked (SET's kept
  # weights), k at most the number of the others: the k-th largest key is unique, so
  # distinct=True gives the masks of the full search without its tie-break: the search
  # loop carries no tie columns (threshold, phase) and computes no tie keys.
  rng = np.random.default_rng(seed)
  shapes = [(48, 48), (64, 40), (48, 48), (30, 90)]
  keys, ks = [], []
  for shape in shapes:
    size = int(np.prod(shape))
    h = np.asarray(selection.hash_keys(jnp.zeros(shape), rng.integers(0, 2**32, 2, np.uint32)))
    blocked = rng.random(shape) < rng.uniform(0.1, 0.9)
    keys.append(jnp.asarray(np.where(blocked, 0, h), jnp.uint32))
    ks.append(int(rng.integers(0, size - blocked.sum() + 1)))
  assert all(int(np.prod(s)) > selection._SORT_AT_MOST for s in shapes)  # searched

  def masks(distinct):
    return selection.topk_masks(keys, ks, distinct=distinct)

  fast = masks(True)
  for m, full, key, k in zip(fast, masks(False), keys, ks, strict=True):
    np.testing.assert_array_equal(m, full)
    assert int(m.sum()) == k
    kept = np.asarray(key)[np.asarray(m)]
    assert k == 0 or kept.min() > np.asarray(key)[~np.asarray(m)].max()

  def loop_states(distinct):
    eqns = jax.make_jaxpr(lambda: masks(distinct))().jaxpr.eqns
    return [v.aval.shape for e in eqns if e.primitive.name == 'while' for v in e.outvars]

  assert loop_states(True) == [(len(keys), 9)] and loop_states(False) == [(len(keys), 11)]


def _first_bracket(fn, *args) -> int:
  """The most keys left in one bracket after the first pass of ``fn``'s one loop."""
  with selection.count_passes() as log:
    out = jax.jit(lambda *a: fn(*a))(*args)  # a new function: traced inside the block
    jax.block_until_ready(out)
    jax.effects_barrier()
  assert log.loops == 1 and log, log
  return log[1].keys if len(log) > 1 else 0  # 0: the first pass found the threshold


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(st.integers(0, 2**32 - 1), st.floats(0.02, 0.5), st.floats(0.0, 0.9))
@hypothesis.example(seed=186329, fraction=0.25, blocked_share=0.0)  # 2.9 sigma off
def test_uniform_keys_start_at_their_expected_quantiles(seed, fraction, blocked_share):
  # SET's grow keys (hash_keys, 0 where a weight is kept): m uniform keys among which
  # the k-th largest is sought. Counting at the quantiles m uniform keys are expected to
  # have leaves about sqrt(k) keys in the first bracket (a sample of 2048 leaves about
  # m / 30: test_set_grows_from_the_expected_quantiles_of_its_keys). The masks are the
  # same as the sampled search's.
  rng = np.random.default_rng(seed)
  shape = (1024, 512)
  h = np.asarray(selection.hash_keys(jnp.zeros(shape), rng.integers(0, 2**32, 2, np.uint32)))
  blocked = rng.random(shape) < blocked_share
  keys = jnp.asarray(np.where(blocked, 0, h), jnp.uint32)
  m = int((~blocked).sum())
  k = max(int(fraction * m), 1)

  def masks(uniform):
    return lambda x: selection.topk_masks([x], [k], distinct=True, uniform=uniform)[0]

  sampled, expected = masks(None), masks([m])
  np.testing.assert_array_equal(jax.jit(expected)(keys), jax.jit(sampled)(keys))
  assert int(jax.jit(expected)(keys).sum()) == k
  sigma = np.sqrt(k * (1 - k / m))
  bracket = _first_bracket(expected, keys)
  # The first pass counts at the keys where k + (2.5, 0.75, 0, -0.75, -2.5) sigma are
  # expected at or above (ascending thresholds).
  pivots = np.asarray(selection._uniform_pivots(jnp.array([k]), jnp.array([m])))[0]
  kth = np.sort(np.asarray(keys).reshape(-1))[-k]
  if pivots[0] <= kth < pivots[-1]:
    # Between two pivots at most 1.75 sigma apart: about sqrt(k) keys.
    assert bracket <= 4 * sigma + 16, (bracket, sigma)
  else:
    # Beyond the 2.5-sigma pivots (about 1.2% of draws): the bracket is the outer part,
    # all the keys below the lowest pivot (the blocked zeros included) or from the highest.
    flat = np.asarray(keys).reshape(-1)
    outer = int((flat < pivots[0]).sum()) if kth < pivots[0] else int((flat >= pivots[-1]).sum())
    assert bracket == outer, (bracket, outer)


def _threshold_passes(fn, *args) -> tuple[int, jax.Array]:
  with selection.count_passes() as log:
    out = jax.jit(fn)(*args)  # a new function: traced inside the block
    jax.block_until_ready(out)
    jax.effects_barrier()
  return sum(r.kind == 'threshold' for r in log), out


def test_uniform_keys_close_a_few_passes_after_the_first():
  # Past the first pass, a bracket of uniform keys in the upper half counts its two
  # pivots around the guess 0.75 deviations of the target's order statistic from it
  # (selection._interpolated_pivots with uniform): the general spread, about 4 of them,
  # and the even split of the last 128 keys left more (16 draws: 4.1 passes on average
  # before, 3.25 now; 6 at most either way).
  passes = []
  for seed in range(16):
    rng = np.random.default_rng(seed)
    shape = (512, 384)
    h = np.asarray(selection.hash_keys(jnp.zeros(shape), rng.integers(0, 2**32, 2, np.uint32)))
    blocked = rng.random(shape) < rng.uniform(0.05, 0.95)
    keys = np.where(blocked, 0, h).astype(np.uint32)
    m = int((~blocked).sum())
    k = int(rng.integers(1, m + 1))
    fn = lambda x, k=k, m=m: selection.topk_masks([x], [k], distinct=True, uniform=[m])[0]  # noqa: E731
    n, mask = _threshold_passes(fn, jnp.asarray(keys))
    np.testing.assert_array_equal(mask, reference_masks([keys], k)[0])
    passes.append(n)
  assert np.mean(passes) <= 3.5, passes


def test_a_bracket_of_few_keys_counts_where_its_target_is_expected():
  # Brackets of at most selection._ORDER_BELOW keys count their two pivots around the
  # guess at 0.75 deviations of the target's order statistic, not at an even split of
  # their range or the interpolation's wide spread: 16 magnitudes of normal weights,
  # 4.5 threshold passes on average before, 3.7 now.
  passes = []
  for seed in range(16):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(512, 768)) * 0.03).astype(np.float32)
    k = int(rng.integers(w.size // 20, w.size * 19 // 20))
    fn = lambda x, k=k: selection.topk_masks([selection.Lazy(jnp.abs, x)], [k])[0]  # noqa: E731
    n, mask = _threshold_passes(fn, jnp.asarray(w))
    np.testing.assert_array_equal(mask, reference_masks([np.abs(w)], k)[0])
    passes.append(n)
  assert np.mean(passes) <= 4.0, passes


def _drifting_weights(seed: int, steps: int) -> list[np.ndarray]:
  """Weights moved as a straight-through step moves them: growing by a common factor
  (their threshold drifts one way) plus noise."""
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=(512, 768)) * 0.03).astype(np.float32)
  out = [w]
  for _ in range(steps):
    w = (w * 1.0005 + rng.normal(size=w.shape) * 2e-6).astype(np.float32)
    out.append(w)
  return out


def _kth_key(w: np.ndarray, k: int) -> int:
  keys = np.sort(np.asarray(selection.sortable_keys(jnp.abs(jnp.asarray(w)))).reshape(-1))
  return int(keys[-k])


def test_a_search_starts_where_the_last_thresholds_lead():
  # Lazy(near=(t, k, t0)): the last two thresholds of the same count. The first pass
  # counts around t + (t - t0) instead of the sample's quantiles (selection._near_pivots):
  # 8 draws of drifting weights, 3.75 threshold passes on average from the sample, 2.25
  # from the last thresholds; the masks are the same.
  passes = {False: [], True: []}
  with selection.count_passes() as log:  # each function traced (and compiled) once

    @jax.jit
    def hinted(x, near, k):
      return selection.topk_masks([selection.Lazy(jnp.abs, x, near=(near, 0))], [k])[0]

    @jax.jit
    def plain(x, near, k):
      del near
      return selection.topk_masks([selection.Lazy(jnp.abs, x)], [k])[0]

    for seed in range(8):
      k = int(np.random.default_rng(seed).integers(20000, 370000))
      w0, w1, w2 = _drifting_weights(seed, 2)
      near = np.array([[_kth_key(w1, k), k, _kth_key(w0, k), k]], np.uint32)
      for fn in (plain, hinted):
        before = len(log)
        mask = fn(jnp.asarray(w2), jnp.asarray(near), jnp.int32(k))
        jax.effects_barrier()
        np.testing.assert_array_equal(mask, reference_masks([np.abs(w2)], k)[0])
        passes[fn is hinted].append(sum(r.kind == 'threshold' for r in log[before:]))
  assert np.mean(passes[True]) <= np.mean(passes[False]) - 1.0, passes


def is_threshold_of(t: int, scores: np.ndarray, k: int) -> bool:
  """Whether the mask of the top ``k`` keeps the keys above ``t`` and some equal to it."""
  keys = np.asarray(selection.sortable_keys(jnp.asarray(scores))).reshape(-1)
  return (keys >= t).sum() >= k and (keys > t).sum() <= k


def test_found_threshold_is_the_threshold_of_the_mask():
  w = _drifting_weights(0, 0)[0]
  w[0, :40] = w[1, 0]  # a tie across the threshold of k = 20

  @jax.jit
  def found_one(x, k):
    mask = selection.topk_masks([selection.Lazy(jnp.abs, x)], [k], lazy=True)[0]
    return selection.found_thresholds([mask])[0]

  for k in (1, 20, 1000, w.size // 2, w.size):
    assert is_threshold_of(int(found_one(jnp.asarray(w), jnp.int32(k))), np.abs(w), k), k
  # Several searches' masks, in any order, and masks of no threshold (0).
  ws = [np.abs(w), np.abs(w[:300]), np.abs(w[:, :500])]
  ks = [500, 7000, 30000]

  @jax.jit
  def found_several(*xs):
    masks = selection.topk_masks(list(xs), ks, lazy=True)
    other = selection.topk_masks([xs[1]], [ks[1]], lazy=True)[0]
    return selection.found_thresholds([masks[2], jnp.ones(3, bool), other, masks[0]])

  found = found_several(*[jnp.asarray(x) for x in ws])
  assert found[1] == 0
  for t, x, k in zip(np.asarray(found)[[0, 2, 3]], [ws[2], ws[1], ws[0]], [ks[2], ks[1], ks[0]]):
    assert is_threshold_of(int(t), x, k), k


def test_stacked_layers_search_from_their_own_last_thresholds_and_give_them_back():
  # A stacked leaf's scores with near=(table, i) take rows i .. i + 2 of the table, one
  # per layer (selection.map_layer_groups); with lazy=True its mask comes back carrying
  # every layer's threshold, which found_thresholds lists in leaf order, a row per layer,
  # among the rows of the masks without layers. 3 layers of drifting weights (and a leaf
  # without layers) run fewer passes from their last thresholds; the masks are the same.
  k, k_plain = 40000, 9000
  layers = [_drifting_weights(seed, 2) for seed in range(3)]
  stacked = [np.stack([w[step] for w in layers]) for step in range(3)]
  plain = _drifting_weights(7, 2)
  # Row 0: the leaf without layers; rows 1-3: the stacked leaf's layers.
  near = np.array(
    [[_kth_key(plain[1], k_plain), k_plain, _kth_key(plain[0], k_plain), k_plain]]
    + [[_kth_key(w[1], k), k, _kth_key(w[0], k), k] for w in layers],
    np.uint32,
  )

  def select(x, y, table):
    hint = (lambda i: {'near': (table, i)}) if table is not None else (lambda i: {})
    scores = [selection.Lazy(jnp.abs, x, **hint(1)), selection.Lazy(jnp.abs, y, **hint(0))]
    return selection.map_layer_groups(
      lambda xs, ks: selection.topk_masks(xs, ks, lazy=True),
      [0, None],
      scores,
      [k, k_plain],
      lazy=True,
    )

  def masks_and_found(x, y, table):
    masks = select(x, y, table)
    assert selection.layers_of(masks[0]) == 3 and selection.layers_of(masks[1]) == 1
    return [selection.materialize(m) for m in masks], selection.found_thresholds(masks)

  x, y = jnp.asarray(stacked[2]), jnp.asarray(plain[2])
  passes = {}
  for hinted in (False, True):
    table = jnp.asarray(near) if hinted else None
    passes[hinted], (masks, found) = _threshold_passes(
      lambda x, y, table=table: masks_and_found(x, y, table), x, y
    )
    for layer in range(3):
      np.testing.assert_array_equal(
        masks[0][layer], reference_masks([np.abs(stacked[2][layer])], k)[0]
      )
      assert is_threshold_of(int(found[layer]), np.abs(stacked[2][layer]), k), layer
    np.testing.assert_array_equal(masks[1], reference_masks([np.abs(plain[2])], k_plain)[0])
    assert is_threshold_of(int(found[3]), np.abs(plain[2]), k_plain)
  assert passes[True] <= passes[False] - 2, passes
  # A row count that is not the stacked mask's layers is refused.
  with pytest.raises(ValueError, match='stacked mask of 3 layers, but layers gives it 2'):
    jax.eval_shape(lambda x, y: selection.found_thresholds(select(x, y, None), [2, 1]), x, y)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  t=st.integers(0, 2**32 - 1),
  t0=st.integers(0, 2**32 - 1),
  kt=st.integers(0, 2**32 - 1),
  k0=st.integers(0, 2**32 - 1),
  k=st.integers(1, 2400),
  seed=st.integers(0, 2**16),
)
def test_any_last_thresholds_give_the_exact_masks(t, t0, kt, k0, k, seed):
  # The hint only places the first pass: wrong keys (anywhere in uint32, below or above
  # the threshold, moving away from it) and counts must not change a mask. Few values,
  # so that ties at the threshold are common.
  rng = np.random.default_rng(seed)
  w = rng.integers(-20, 20, size=(40, 60)).astype(np.float32)
  near = np.array([[t, kt, t0, k0]], np.uint32)
  mask = _hinted_mask(jnp.asarray(w), jnp.asarray(near), jnp.int32(k))
  np.testing.assert_array_equal(mask, reference_masks([np.abs(w)], k)[0])


@jax.jit
def _hinted_mask(x, near, k):
  return selection.topk_masks([selection.Lazy(jnp.abs, x, near=(near, 0))], [k])[0]


def test_random_pruning_keys_start_where_the_nonzero_weights_put_the_threshold():
  # Gradual random pruning: the weights pruned before (8% here) are 0, their keys below
  # the others (selection.zeros_lowest); 89% are kept. The first pass is placed for the
  # nonzero weights' keys, as many as it counts (3 passes in all): placed for every key,
  # it missed its bracket, and the search took 6 (8 in a step of the benchmark MLP).
  rng = np.random.default_rng(0)
  w = np.where(rng.random((768, 512)) < 0.08, 0.0, rng.normal(size=(768, 512)))
  w = jnp.asarray(w, jnp.float32)
  keys = selection.Lazy(selection.hash_keys_at, w, jnp.array([[7, 8]], jnp.uint32), np.int32(0))
  k = int(0.89 * w.size)
  fn = lambda w: selection.topk_masks([selection.Lazy(selection.zeros_lowest, w, keys)], [k])[0]  # noqa: E731
  n, mask = _threshold_passes(fn, w)
  want = np.asarray(selection.zeros_lowest(w, keys()))
  np.testing.assert_array_equal(mask, reference_masks([want], k)[0])
  assert not np.asarray(mask)[np.asarray(w) == 0].any()
  assert n <= 4, n


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
  st.lists(st.tuples(st.integers(1, 2**31 - 1), st.integers(-5, 2**31 - 1)), min_size=1, max_size=6)
)
def test_uniform_pivots_are_sorted_keys_around_the_expected_quantile(pairs):
  # Any claim (m below k, or negative, included) gives sorted thresholds in the keys'
  # range [2**31, 2**32 - 1], the middle one where m uniform keys put the k-th largest.
  k = np.array([a for a, _ in pairs], np.int32)
  m = np.array([b for _, b in pairs], np.int32)
  pivots = np.asarray(jax.jit(selection._uniform_pivots)(jnp.asarray(k), jnp.asarray(m)))
  assert pivots.shape == (len(pairs), 5) and pivots.dtype == np.uint32
  assert np.all(np.diff(pivots.astype(np.int64), axis=1) >= 0)
  assert pivots.min() >= 2**31 and pivots.max() <= 2**32 - 1
  mm = np.maximum(m, k).astype(np.float64)
  expected = 2**32 - 2**31 * k.astype(np.float64) / mm  # k of mm keys at or above
  tolerance = 2**31 / mm * (0.01 * np.sqrt(k) + 1) + 256  # float32 rounding
  assert np.all(np.abs(pivots[:, 2] - expected) <= tolerance), (pivots[:, 2], expected)


@pytest.mark.parametrize('claim', ['too_many', 'too_few', 'not_uniform'])
def test_a_wrong_uniform_claim_costs_passes_not_exactness(claim):
  rng = np.random.default_rng(3)
  shape = (256, 300)
  h = np.asarray(selection.hash_keys(jnp.zeros(shape), jnp.array([3, 4], jnp.uint32)))
  blocked = rng.random(shape) < 0.5
  keys = np.where(blocked, 0, h).astype(np.uint32)
  if claim == 'not_uniform':  # the keys bunched at the top of their range
    keys = np.where(blocked, 0, 2**32 - 1 - ((h - 2**31) >> 12)).astype(np.uint32)
  m = int((~blocked).sum())
  uniform = {'too_many': shape[0] * shape[1], 'too_few': 10, 'not_uniform': m}[claim]
  for k in (1, 999, m // 2, m):
    mask = selection.topk_masks([jnp.asarray(keys)], [k], distinct=True, uniform=[uniform])[0]
    np.testing.assert_array_equal(mask, reference_masks([keys], k)[0])


def test_uniform_claims_one_count_per_array():
  with pytest.raises(ValueError, match='2 score arrays but 1 counts of uniform keys'):
    selection.topk_masks([jnp.ones(4), jnp.ones(4)], [1, 1], uniform=[4])


def _has_callback(fn, *args) -> bool:
  # A new function each time: jax caches traces by function.
  return 'debug_callback' in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_count_passes_records_each_pass_of_the_loops_traced_inside():
  rng = np.random.default_rng(0)
  # Heavy ties: the threshold searches end on tied keys and the tie searches run too, in
  # the same loop (a pass records once for each kind of search it serves).
  arrays = [make_scores('few_values', shape, rng) for shape in [(64, 64), (40, 300)]]
  k = [1000, 5000]

  def fn(a, b):
    return selection.topk_masks([a, b], k)

  assert not _has_callback(fn, *arrays)  # nothing recorded outside the block
  with selection.count_passes() as log:
    masks = jax.jit(lambda a, b: fn(a, b))(*arrays)
    jax.block_until_ready(masks)
    jax.effects_barrier()
    assert log.loops == 1
    assert _has_callback(fn, *arrays)
  for m, a, kk in zip(masks, arrays, k, strict=True):
    np.testing.assert_array_equal(m, reference_masks([a], kk)[0])
  assert {r.kind for r in log} == {'threshold', 'tie'}
  # A pass that served both kinds records once for each, under one index.
  assert log.passes(0) == len({r.index for r in log}) < len(log)
  threshold = [r for r in log if r.kind == 'threshold']
  tie = [r for r in log if r.kind == 'tie']
  # The first pass counts every key of both arrays; threshold brackets only narrow and
  # close, then each starts its tie search (one at most on each array).
  assert threshold[0] == selection.SearchPass(0, 'threshold', 2, 2, 12_000)
  assert all(r.brackets == 2 and 1 <= r.open <= 2 for r in log)
  assert all(a.open >= b.open and a.keys >= b.keys for a, b in zip(threshold, threshold[1:]))
  assert threshold[-1].keys < threshold[0].keys
  # Tie brackets start at the tied keys: fewer than the arrays' sizes, and they narrow.
  assert tie[0].keys < 4096 and tie[-1].keys < tie[0].keys
  # Traced after the block: no records.
  before = len(log)
  jax.block_until_ready(jax.jit(lambda a: selection.topk_mask(a, 7))(arrays[0]))
  jax.effects_barrier()
  assert len(log) == before


def test_count_passes_sums_the_layers_of_a_stack():
  stacked = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64, 64)), jnp.float32)
  with selection.count_passes() as log:
    masks = jax.jit(lambda s: selection.map_layers(lambda a: selection.topk_mask(a, 100), 0, s))(
      stacked
    )
    jax.block_until_ready(masks)
    jax.effects_barrier()
  np.testing.assert_array_equal(masks.sum(axis=(1, 2)), [100, 100, 100])
  # One record per pass for the three layers' brackets, not one per layer.
  assert log and all(r.brackets == 3 for r in log)
  assert log[0].open == 3 and log[0].keys == 64 * 64


def _passes_of_exact_masks(arrays, k, kind: str) -> dict[str, int]:
  """The ``kind`` passes ('threshold' or 'tie') of the top-k masks of ``|arrays|``, each
  array on its own (``k[i]``) and over both (``sum(k)``), by name; checks both masks
  against a stable sort."""
  inputs = lambda a, b: [selection.Lazy(jnp.abs, a), selection.Lazy(jnp.abs, b)]  # noqa: E731
  fns = {
    'each': lambda a, b: selection.topk_masks(inputs(a, b), k),
    'global': lambda a, b: selection.global_topk_masks(inputs(a, b), sum(k)),
  }
  scores = [np.abs(np.asarray(a)) for a in arrays]
  passes = {}
  for name, fn in fns.items():
    with selection.count_passes() as log:
      masks = jax.jit(fn)(*arrays)
      jax.block_until_ready(masks)
      jax.effects_barrier()
    passes[name] = sum(r.kind == kind for r in log)
    if name == 'each':
      want = [reference_masks([sc], n)[0] for sc, n in zip(scores, k, strict=True)]
    else:
      want = reference_masks(scores, sum(k))
    for m, wm in zip(masks, want, strict=True):
      np.testing.assert_array_equal(m, wm)
  return passes


@pytest.mark.parametrize('fraction_zero', [0.6, 0.95])
def test_a_threshold_tied_by_many_keys_closes_in_few_passes(fraction_zero):
  # Saliency scores |w * g| during training: the pruned weights and the dead units score
  # exactly 0, and the k-th largest score is that 0 when fewer than k score above it.
  # Every key of the bracket is then one value, so a pass can narrow its key range but
  # count no key out of it; interpolating by the counts halved the range a pass (28
  # threshold passes of a saliency mask update; here 24 with 60% zeros and 17 with 95%,
  # each array on its own and over both). A pass that counts no key out of a bracket at
  # the end it moved is followed by pivots whose outer two are its ends: 2 passes here.
  rng = np.random.default_rng(1)
  w = np.abs(rng.standard_normal((512, 512))).astype(np.float32)
  w[rng.random(w.shape) < fraction_zero] = 0.0
  arrays = [jnp.asarray(w), jnp.asarray(w.T.copy())]
  k = [w.size // 2, w.size // 2]  # above the nonzero count: the threshold is the tied 0

  for name, passes in _passes_of_exact_masks(arrays, k, 'threshold').items():
    assert 1 <= passes <= 6, (name, passes)


@pytest.mark.parametrize('kind', ['bf16', 'quarters'])
def test_the_tie_search_starts_at_the_tied_positions(kind):
  # Scores of few values (bfloat16 weights, quantized ones): many keys equal the k-th
  # largest, and the tie loop finds the position cutoff among them. Its tie keys are
  # MAX - position for the tied keys: its first bracket starts at the last position's
  # key with the tied count. Started at 0 with every key, as the threshold search does,
  # its first pass was spent below every tie key: here 6 passes (each array on its own)
  # and 8 (over both) on bfloat16 scores, 13 and 8 on quarters; now 3, 3, 5 and 4.
  rng = np.random.default_rng(0)
  w = rng.standard_normal((512, 512)).astype(np.float32)
  if kind == 'bf16':
    w = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
  else:
    w = np.round(w * 4) / 4
  arrays = [jnp.asarray(w), jnp.asarray(w[::-1].copy())]
  k = [w.size // 10, w.size // 2]

  for name, passes in _passes_of_exact_masks(arrays, k, 'tie').items():
    assert 1 <= passes <= 6, (name, passes)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_sixteen_bit_keys_order_every_value_as_float32_keys_do(dtype):
  # Every bit pattern of the dtype: keys below 2**16, increasing with the value (-0 below
  # +0, as for float32), NaN one above -inf, and the order of the float32 keys.
  vals = jax.lax.bitcast_convert_type(jnp.arange(2**16, dtype=jnp.uint16), dtype)
  f = np.asarray(vals.astype(jnp.float32))
  keys = np.asarray(selection.sortable_keys(vals)).astype(np.int64)
  wide = np.asarray(selection.sortable_keys(vals.astype(jnp.float32))).astype(np.int64)
  assert keys.max() < 2**16
  number = ~np.isnan(f)
  order = np.lexsort((wide[number], f[number]))
  assert np.all(np.diff(keys[number][order]) > 0)
  assert np.all(np.diff(wide[number][order]) > 0)
  lowest = keys[number].min()
  assert keys[f == -np.inf][0] == lowest and np.all(keys[~number] == lowest + 1)


def test_a_bfloat16_threshold_search_closes_in_few_passes():
  # bfloat16 scores as float32 keys are 2**16 apart: the last brackets held a few keys
  # with wide gaps between them, each closed by splitting it 6 ways a pass (12 and 13
  # passes here). As 16-bit keys, consecutive values are consecutive keys (3 and 3).
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((512, 512)), jnp.bfloat16)
  arrays = [w, w[::-1]]
  k = [w.size // 10, w.size // 2]
  with selection.count_passes() as log:
    masks = jax.jit(
      lambda a, b: selection.topk_masks([selection.Lazy(jnp.abs, x) for x in (a, b)], k)
    )(*arrays)
    jax.block_until_ready(masks)
    jax.effects_barrier()
  assert 1 <= sum(r.kind == 'threshold' for r in log) <= 5, log
  for m, a, n in zip(masks, arrays, k, strict=True):
    scores = np.abs(np.asarray(a, np.float32)).reshape(-1)
    want = np.zeros(scores.size, bool)
    want[np.lexsort((np.arange(scores.size), -scores))[:n]] = True
    np.testing.assert_array_equal(np.asarray(m).reshape(-1), want)


def test_a_search_over_arrays_of_several_dtypes_compares_their_values():
  # 16-bit keys are below every float32 key: one threshold over a bfloat16 and a float32
  # array reads the bfloat16 scores as float32, so the masks follow the values.
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((48, 64)), jnp.float32)
  k = 3000
  masks = jax.jit(lambda a, b: selection.global_topk_masks([a, b], k, score_fn=jnp.abs))(a, b)
  scores = np.abs(
    np.concatenate([np.asarray(a, np.float32).reshape(-1), np.asarray(b).reshape(-1)])
  )
  want = np.zeros(scores.size, bool)
  want[np.lexsort((np.arange(scores.size), -scores))[:k]] = True
  got = np.concatenate([np.asarray(m).reshape(-1) for m in masks])
  np.testing.assert_array_equal(got, want)
  assert int(masks[0].sum()) > 0 and int(masks[1].sum()) > 0

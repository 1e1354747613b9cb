"""One selection for many leaves: ``selection.topk_masks`` against per-leaf ``topk_mask``,
and the number of selection loops of a compiled step, which must not grow with the leaves.
These are tests of the search loops, so every selection here is made by them, however
small its arrays (small arrays are sorted otherwise; ``test_selection_sort.py``)."""

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import _xla_workarounds
from prunax import selection
from prunax import sparsity_schedules as sched
from tests.core.helpers import make_step
from tests.core.helpers import mlp_params
from tests.core.test_selection import KINDS
from tests.core.test_selection import make_scores
from tests.core.test_selection import reference_masks
from tests.xla_env import compile_as_users

pytestmark = pytest.mark.usefixtures('search_path')

SHAPES = [(7, 13), (5,), (3, 4, 6), (64, 32), (1,), (40, 3), (96,)]


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
  shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4),
  kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4),
  ks=st.lists(st.sampled_from(['zero', 'all', 'one', 'half', 'random']), min_size=4, max_size=4),
  seed=st.integers(0, 2**16),
)
def test_topk_masks_equal_per_leaf_topk_mask(shapes, kinds, ks, seed):
  # Ties (few values, mostly zero), -inf, NaN and subnormals, with k = 0, 1, n and others.
  rng = np.random.default_rng(seed)
  arrays = [jnp.asarray(make_scores(kind, s, rng)) for s, kind in zip(shapes, kinds)]
  counts = []
  for a, k in zip(arrays, ks):
    n = a.size
    counts.append({'zero': 0, 'all': n, 'one': 1, 'half': n // 2}.get(k, rng.integers(0, n + 1)))
  # One compiled computation for the joint masks and one for the per-leaf ones (eagerly,
  # every operation of the selection is compiled on its own).
  got = jax.jit(selection.topk_masks, static_argnums=1)(arrays, tuple(int(k) for k in counts))
  per_leaf = jax.jit(
    lambda xs: [selection.topk_mask(a, int(k)) for a, k in zip(xs, counts, strict=True)]
  )(arrays)
  for a, k, g, want in zip(arrays, counts, got, per_leaf, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want), err_msg=f'k={k} of {a.size}')
    assert int(np.asarray(g).sum()) == k


def _k_at(keys: np.ndarray, how: str, rng) -> int:
  """A count for the descending ``keys``: where a run of equal keys ends (``'exact'``: no
  tie to break), inside one (``'tied'``, where there is one), or anywhere."""
  j = int(rng.integers(1, keys.size))
  if how == 'exact':
    while j < keys.size and keys[j] == keys[j - 1]:
      j += 1
  elif how == 'tied':
    inside = np.flatnonzero(keys[1:] == keys[:-1]) + 1
    j = int(rng.choice(inside)) if inside.size else j
  return j


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  kinds=st.lists(
    st.sampled_from(['normal', 'few_values', 'mostly_zero', 'special']), min_size=3, max_size=3
  ),
  at=st.lists(st.sampled_from(['tied', 'exact', 'random']), min_size=3, max_size=3),
  seed=st.integers(0, 2**16),
)
def test_one_loop_breaks_ties_while_other_thresholds_are_searched(kinds, at, seed):
  # Searched arrays whose thresholds close at different passes, some where exactly k
  # keys are at or above, some on a key held by more than they keep: each goes on to
  # break its tie, in the same loop, while the others still search their thresholds.
  # Every mask is the stable sort's: each array on its own, one threshold over all, and
  # each layer of a stack on its own (the loop under vmap).
  rng = np.random.default_rng(seed)
  arrays = [make_scores(kind, s, rng) for kind, s in zip(kinds, [(40, 30), (64, 32), (33, 40)])]
  assert all(a.size > selection._SORT_AT_MOST for a in arrays)
  keys = [
    np.sort(np.asarray(selection.sortable_keys(jnp.asarray(a))).reshape(-1))[::-1] for a in arrays
  ]
  ks = [_k_at(key, how, rng) for key, how in zip(keys, at, strict=True)]
  xs = [jnp.asarray(a) for a in arrays]
  each = jax.jit(lambda *xs: selection.topk_masks(list(xs), ks))(*xs)
  for a, k, got in zip(arrays, ks, each, strict=True):
    np.testing.assert_array_equal(np.asarray(got), reference_masks([a], k)[0], err_msg=f'k={k}')
  total = sum(ks)
  over_all = jax.jit(lambda *xs: selection.global_topk_masks(list(xs), total))(*xs)
  for got, want in zip(over_all, reference_masks(arrays, total), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f'k={total} over all')
  stack = np.stack([make_scores(kind, (64, 32), rng) for kind in kinds])
  k = ks[1]
  layers = jax.jit(lambda s: selection.map_layers(lambda a: selection.topk_mask(a, k), 0, s))(
    jnp.asarray(stack)
  )
  for layer, got in zip(stack, layers, strict=True):
    np.testing.assert_array_equal(np.asarray(got), reference_masks([layer], k)[0])


def test_topk_masks_lazy_traced_k_and_layer_groups():
  rng = np.random.default_rng(3)
  w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(4, 16, 8), (16, 8), (4, 8)]]
  axes = [0, None, 1]  # two stacked leaves of 4 layers (axes 0 and 1) and a plain one

  @jax.jit
  def masks(w, k):
    def group(xs, ks):
      return selection.topk_masks([selection.Lazy(jnp.abs, x) for x in xs], ks)

    return selection.map_layer_groups(group, axes, w, [k, k + 1, k + 2])

  got = masks(w, jnp.int32(5))
  for x, a, k, g in zip(w, axes, [5, 6, 7], got, strict=True):
    if a is None:
      want = jax.jit(lambda x, k=k: selection.topk_mask(jnp.abs(x), k))(x)
    else:
      want = jax.jit(
        lambda x, k=k, a=a: selection.map_layers(lambda y: selection.topk_mask(jnp.abs(y), k), a, x)
      )(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))
  with pytest.raises(ValueError, match='2 score arrays but 1 counts'):
    selection.topk_masks(w[:2], [1])


def loops(updater, layers: int) -> int:
  """The number of while loops in the lowered train step of an MLP of ``layers`` layers."""
  params = mlp_params(sizes=(32,) * (layers + 1))
  tx = updater.wrap_optax(optax.adam(1e-3))
  batch = (jnp.zeros((4, 32)), jnp.zeros((4, 32)))
  text = jax.jit(make_step(tx)).lower(params, tx.init(params), batch).as_text()
  return text.count('stablehlo.while')


@pytest.mark.parametrize(
  'make',
  [
    lambda: prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.OneShotSchedule(0)),
    lambda: prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 0, 10)),
    lambda: prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 0, 10)),
  ],
  ids=['magnitude', 'set', 'rigl'],
)
def test_one_selection_loop_for_all_leaves(make):
  # Per-leaf loops would add 2 (4 for drop and grow) per leaf.
  assert loops(make(), 7) == loops(make(), 2)


def test_magnitude_step_has_one_loop():
  # One loop finds every leaf's threshold and breaks its ties (a second loop for the
  # ties compiled its own counting kernels and bookkeeping).
  updater = prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.OneShotSchedule(0))
  assert loops(updater, 7) == 1


def body_equations(fn, *args) -> int:
  """Equations inside the while loops of ``fn``'s jaxpr (nested jaxprs included)."""

  def count(jaxpr, inside):
    total = 0
    for e in jaxpr.eqns:
      total += inside
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        total += count(sub, inside or e.primitive.name == 'while')
    return total

  # A fresh function each time: make_jaxpr caches traces by function (and the chunk size
  # is read while tracing).
  return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr, False)


def alike(n: int, seed: int = 0, shape=(16, 32)):
  rng = np.random.default_rng(seed)
  kinds = KINDS * n
  return [jnp.asarray(make_scores(kinds[i], shape, rng), jnp.float32) for i in range(n)]


def per_leaf(xs, ks=None):
  ks = [100] * len(xs) if ks is None else ks
  return selection.topk_masks([selection.Lazy(jnp.abs, x) for x in xs], ks)


def test_alike_leaves_count_in_one_computation(monkeypatch):
  # Leaves of one shape and scoring are stacked inside each counting pass and counted by
  # one vmapped computation: the loops' bodies do not grow with the number of leaves
  # (they grew by ~70 equations per leaf when each leaf was counted on its own).
  def shared(xs):
    return selection.global_topk_masks(xs, 500, score_fn=jnp.abs)

  for fn in (per_leaf, shared):
    assert body_equations(fn, alike(6)) == body_equations(fn, alike(2)), fn.__name__
  # Chunks of at most FUSED_CONCAT_OPERANDS leaves: 3 chunks of 2 for 6 leaves.
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', 2)
  assert body_equations(per_leaf, alike(6)) > body_equations(per_leaf, alike(2))
  leaves = [selection.Lazy(jnp.abs, x) for x in alike(6)]
  assert selection._alike_groups(leaves) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize('chunk', [1, 2, 8])
def test_alike_leaves_give_the_per_leaf_masks(monkeypatch, chunk):
  # Ties, -inf, NaN and subnormals in leaves of one shape, counted alone, in chunks of 2
  # or all together; per leaf and global (ties kept by position across the leaves).
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', chunk)
  xs = alike(7, seed=chunk)
  ks = [0, 1, 511, 512, 37, 256, 300]
  got = jax.jit(lambda xs: per_leaf(xs, ks))(xs)
  # The references compiled too (eagerly, each operation is compiled on its own).
  want = jax.jit(lambda xs: [selection.topk_mask(jnp.abs(x), k) for x, k in zip(xs, ks)])(xs)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # A new function: a trace of another test's chunk size must not be reused.
  global_masks = jax.jit(lambda xs, k: selection.global_topk_masks(xs, k), static_argnums=1)
  for k in (1, 1000, 3584):
    got = np.concatenate([np.asarray(m).ravel() for m in global_masks(xs, k)])
    keys = np.asarray(selection.sortable_keys(jnp.concatenate([x.ravel() for x in xs])))
    # The reference: the k largest keys, equal keys by lowest position (a stable sort).
    want = np.zeros(keys.size, bool)
    want[np.argsort(-keys.astype(np.int64), kind='stable')[:k]] = True
    np.testing.assert_array_equal(got, want, err_msg=f'k={k}')


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(n=st.integers(1, 300), most=st.integers(1, 16))
def test_alike_chunks_are_equal_where_they_can_be(n, most):
  # Every chunk size compiles its own kernels: alike leaves are split into chunks of one
  # size when that takes at most one chunk more than the fewest, else of two sizes.
  leaves = [selection.Lazy(jnp.abs, jnp.ones((2, 2))) for _ in range(n)]
  chunks = selection._alike_groups(leaves, max_members=most)
  assert [i for chunk in chunks for i in chunk] == list(range(n))
  sizes = [len(chunk) for chunk in chunks]
  fewest = -(-n // most)
  assert max(sizes) <= most and len(sizes) <= fewest + 1
  if any(n % c == 0 and n // c <= most for c in (fewest, fewest + 1)):
    assert len(set(sizes)) == 1, sizes
  else:
    assert len(sizes) == fewest and max(sizes) - min(sizes) == 1, sizes


def test_alike_groups_by_what_the_scores_compute():
  a, b = jnp.ones((4, 64)), jnp.ones((4, 64))
  packed = prunax.masks.pack_mask(a > 0)
  groups = selection._alike_groups(
    [
      selection.Lazy(jnp.abs, a),
      prunax.masks.lazy_mask(packed, (4, 64)),  # a lambda per leaf, alike by code and closure
      selection.Lazy(jnp.abs, b),
      prunax.masks.lazy_mask(packed, (4, 64)),
      selection.Lazy(jnp.abs, jnp.ones((64, 4))),  # another shape
      selection.Lazy(lambda x, c=a: x * c, a),  # an array in its defaults: alone
      selection.Lazy(lambda x, c=a: x * c, a),
      selection.Lazy(jnp.abs, a.astype(jnp.bfloat16)),  # another dtype
    ],
  )
  assert groups == [[0, 2], [1, 3], [4], [5], [6], [7]]


def test_stacking_alike_leaves_stores_nothing():
  # The stacks are fused into the counting passes: a top-k over 8 leaves of one shape
  # holds no more temporaries than counting every leaf on its own (35 KB measured; a
  # stored stack would add 8 MB, the fields of a vmapped count 1.3 MB).
  xs = [jax.random.normal(jax.random.PRNGKey(i), (512, 512)) for i in range(8)]

  def temp_bytes():
    compiled = compile_as_users(jax.jit(lambda xs: per_leaf(xs, [99] * 8)).lower(xs))
    return compiled.memory_analysis().temp_size_in_bytes

  grouped = temp_bytes()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', 1)
    alone = temp_bytes()
  assert grouped <= alone, (grouped, alone)


def loop_body_kernels(fn, *args) -> int:
  """Kernels (fusions and other non-trivial instructions) in the while-loop bodies of
  ``fn``'s optimized HLO on this backend."""
  # A fresh function: jit caches traces by function (and the chunk size is read while
  # tracing).
  text = compile_as_users(jax.jit(lambda *a: fn(*a)).lower(*args)).as_text()
  bodies = set(re.findall(r'while\([^)]*\).*?body=%?([\w.-]+)', text))
  kernels, name = 0, None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      name = line.split()[0].lstrip('%')
    elif name in bodies and re.search(r'= \S+ (fusion|reduce|reduce-window)\(', line):
      kernels += 1
  return kernels


@pytest.mark.parametrize('chunk', [1, 2])
def test_the_fields_of_all_groups_are_summed_once(monkeypatch, chunk):
  # Every stack of alike leaves (or lone leaf) adds its counting kernel, and for a stack
  # the gather of its pivots, to a pass; the 5 counts packed in each row's fields are
  # summed for all stacks of one row count together. Each summing its own fields added
  # 3 to 17 kernels per stack to each loop: 2 -> 8 leaves went 30 -> 70 kernels alone,
  # 42 -> 142 in stacks of 2; now 22 -> 34 either way.
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', chunk)
  few, many = (loop_body_kernels(per_leaf, alike(n, shape=(64, 64))) for n in (2, 8))
  more_stacks = (8 - 2) // chunk
  assert many - few <= 2 * 2 * more_stacks + 2, (few, many)  # 2 loops, <= 2 kernels each


def test_a_pass_reads_only_the_buckets_with_an_open_search():
  # Two arrays of different rows shapes (two buckets); the first starts closed (k is
  # its size: every key at or above the first bracket's lower end), so no pass may read
  # it.
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((40, 96)), jnp.float32)
  reads = []

  def key_fn(i, x, witness):
    del witness
    jax.debug.callback(lambda i: reads.append(int(i)), i)
    return selection.sortable_keys(x.rows())

  inputs = [selection.Lazy(jnp.abs, a), selection.Lazy(jnp.abs, b)]
  k = jnp.array([a.size, b.size // 3], jnp.int32)
  first = jnp.tile(jnp.arange(1, 6, dtype=jnp.uint32) << 29, (2, 1))  # no sample read
  search = jax.jit(lambda k: selection._search_each(inputs, key_fn, k, first=first))
  t, c_t, _ = search(k)
  jax.effects_barrier()
  assert reads.count(1) >= 2  # b's search took passes...
  assert reads.count(0) == 0  # ...none of which read a
  # b's threshold is right: exactly k keys at or above it, or the k-th largest key.
  keys = np.asarray(selection.sortable_keys(jnp.abs(b))).reshape(-1)
  t_b, c_b, k_b = int(t[1]), int(c_t[1]), int(k[1])
  assert c_b == np.sum(keys >= t_b)
  assert c_b == k_b or c_b > k_b > np.sum(keys > t_b)


def test_under_map_layers_a_bucket_is_skipped_by_a_branch():
  # A per-layer flag would make vmap turn the cond into a select that computes both
  # branches (every bucket read in every pass); the flag is or-ed over the layers.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 64, 32)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((3, 40, 96)), jnp.float32)

  def masks(x, y):
    return selection.map_layers(lambda u, v: selection.topk_masks([u, v], [100, 1000]), 0, x, y)

  hlo = compile_as_users(jax.jit(masks).lower(x, y)).as_text()
  assert re.search(r'\bconditional\(', hlo), 'the bucket reads are not branches'
  got = jax.jit(masks)(x, y)
  layer_masks = jax.jit(lambda u, v: selection.topk_masks([u, v], [100, 1000]))
  for layer in range(3):
    want = layer_masks(x[layer], y[layer])
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g[layer]), np.asarray(w))

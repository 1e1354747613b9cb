"""Alike lazy masks are evaluated and packed together when a mask update stores them.

A mask update's final masks (threshold comparisons of the scores, ``selection.Lazy``)
reach ``store_masks`` unevaluated; alike ones (repeated blocks' kernels) are evaluated
and packed by one vmapped computation (``selection.map_alike``), so a step compiles one
threshold-and-pack kernel per group, not per leaf. These tests check that the stored
masks are bit-identical to evaluating and packing each mask on its own, that the
traced computation no longer grows by a whole mask computation per leaf, and that
strategies and structures written before ``lazy`` existed still work.
"""

import collections
import dataclasses
import weakref

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import _checks
from prunax import _xla_workarounds
from prunax import masks as masks_lib
from prunax import selection
from prunax import sparsity_schedules as sched
from prunax import sparsity_types
from prunax import strategies
from tests.core import helpers
from tests.xla_env import compile_as_users


def _params(n, shape=(64, 128), extra=True):
  keys = jax.random.split(jax.random.PRNGKey(0), n + 2)
  params = {f'l{i}': jax.random.normal(keys[i], shape) for i in range(n)}
  if extra:  # leaves of other shapes: groups of one, and an unaligned last axis
    params['odd'] = jax.random.normal(keys[n], (12, 20))
    params['conv'] = jax.random.normal(keys[n + 1], (3, 3, 8, 16))
  return params


def _per_leaf(updater, params, sparsities, like, **inputs):
  """The stored masks of evaluating and packing every mask on its own (the reference)."""
  return updater.store_masks(updater.compute_masks(params, sparsities, **inputs), like=like)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
  )


@pytest.mark.parametrize('packed', [True, False])
@pytest.mark.parametrize(
  'make',
  [
    lambda packed: prunax.MagnitudePruning(sparsity=0.8, packed_masks=packed),
    lambda packed: prunax.GlobalMagnitudePruning(sparsity=0.8, packed_masks=packed),
  ],
  ids=['magnitude', 'global'],
)
def test_stored_masks_equal_evaluating_each_mask(make, packed):
  # 11 alike leaves: chunks of FUSED_CONCAT_OPERANDS (8) and 3, plus two of their own.
  updater = make(packed)
  params = _params(11)
  targets = updater.target_sparsities(params)
  like = updater.store_masks(updater.init_masks(params, targets))
  got = jax.jit(lambda p: updater.store_masks(updater.new_masks(p, targets), like=like))(params)
  want = jax.jit(lambda p: _per_leaf(updater, p, targets, like))(params)
  assert _equal(got, want)
  kept = prunax.summarize_sparsity(
    jax.tree.map(
      lambda p, m: jnp.where(m, p, 0), params, masks_lib.unpack_masks(got, params), is_leaf=None
    )
  )
  assert abs(kept['total_sparsity'] - 0.8) < 0.01


@pytest.mark.parametrize('cls', [prunax.SET, prunax.RigL])
def test_drop_and_grow_masks_are_stored_as_evaluated_each(cls):
  updater = cls(sparsity=0.7, scheduler=sched.PeriodicSchedule(1, 0), drop_fraction_fn='constant')
  params = _params(10)
  tx = updater.wrap_optax(optax.sgd(0.1))
  state = tx.init(params)
  sparse = prunax.get_sparse_state(state)
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  targets = updater.target_sparsities(params)
  old = masks_lib.lazy_masks(sparse.masks, params)
  inputs = dict(sparse_state=sparse, grads=grads, old_masks=old)
  got = jax.jit(
    lambda p: updater.store_masks(updater.new_masks(p, targets, **inputs), like=sparse.masks)
  )(params)
  want = jax.jit(lambda p: _per_leaf(updater, p, targets, sparse.masks, **inputs))(params)
  assert _equal(got, want)
  # A real drop and grow happened: the masks changed, and kept their counts.
  before = masks_lib.unpack_masks(sparse.masks, params)
  after = masks_lib.unpack_masks(got, params)
  assert any(not np.array_equal(before[k], after[k]) for k in params)
  for k in params:
    assert int(before[k].sum()) == int(after[k].sum())


def _eqns(fn, *args) -> int:
  """Equations of ``fn``'s jaxpr, those of nested jaxprs (jit, cond, while) included."""

  def count(jaxpr):
    return sum(
      1 + sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns
    )

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.usefixtures('search_path')  # the leaves here are small enough to be sorted
def test_a_mask_update_does_not_grow_by_a_mask_computation_per_alike_leaf():
  updater = prunax.MagnitudePruning(sparsity=0.8)

  def growth(store):
    sizes = []
    for n in (2, 6):
      params = _params(n, extra=False)
      targets = updater.target_sparsities(params)
      like = updater.store_masks(updater.init_masks(params, targets))
      sizes.append(_eqns(lambda p, t=targets, old=like: store(p, t, old), params))
    return (sizes[1] - sizes[0]) / 4

  grouped = growth(lambda p, t, old: updater.store_masks(updater.new_masks(p, t), like=old))
  alone = growth(lambda p, t, old: _per_leaf(updater, p, t, old))
  # Alone, each leaf adds its threshold comparison and its packing (~58 equations);
  # grouped, its slice of the stacked result and its operands of the stack (~24).
  assert grouped < 0.6 * alone, (grouped, alone)


def test_grouped_temporaries_are_at_most_the_packed_bits_more():
  updater = prunax.MagnitudePruning(sparsity=0.8)
  params = _params(8, extra=False)
  targets = updater.target_sparsities(params)
  like = updater.store_masks(updater.init_masks(params, targets))

  def temps(fn):
    compiled = compile_as_users(jax.jit(fn).lower(params))
    return compiled.memory_analysis().temp_size_in_bytes

  grouped = temps(lambda p: updater.store_masks(updater.new_masks(p, targets), like=like))
  alone = temps(lambda p: _per_leaf(updater, p, targets, like))
  packed_bytes = sum(m.size for m in jax.tree.leaves(like))
  # The stacked packed bits are stored once before they are split; nothing full-size.
  assert grouped <= alone + packed_bytes, (grouped, alone, packed_bytes)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  sizes=st.lists(st.sampled_from([(4, 32), (3, 5), (2, 8, 16)]), min_size=1, max_size=11),
  seed=st.integers(0, 2**16),
)
def test_map_alike_is_fn_of_each_value(sizes, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  values = []
  for i, (key, shape) in enumerate(zip(keys, sizes, strict=True)):
    w = jax.random.normal(key, shape)
    # Alike lazy values, arrays, and a lazy value with its own function.
    values.append(
      w if i % 4 == 3 else selection.Lazy(jnp.abs, w) if i % 4 else selection.Lazy(jnp.sin, w)
    )

  def fn(x):
    return {'sum': jnp.sum(x), 'bits': masks_lib.pack_mask(x > 0.5)}

  got = selection.map_alike(fn, values)
  want = [fn(selection.materialize(v)) for v in values]
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g['sum'], w['sum'], rtol=1e-6)
    np.testing.assert_array_equal(g['bits'], w['bits'])


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  sizes=st.lists(st.sampled_from([(4, 32), (3, 5), (2, 8, 16)]), min_size=1, max_size=11),
  seed=st.integers(0, 2**16),
)
def test_concat_alike_is_the_concatenation_in_value_order(sizes, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  values = [
    w if i % 3 == 2 else selection.Lazy(jnp.abs, w)
    for i, w in enumerate(jax.random.normal(k, s) for k, s in zip(keys, sizes, strict=True))
  ]

  def fn(x):  # results of a size that differs between shapes, and a pytree of two
    return jnp.sum(x, axis=-1).reshape(-1)[:3], jnp.max(x)

  got = jax.jit(lambda: selection.concat_alike(fn, values))()
  want = [fn(selection.materialize(v)) for v in values]
  np.testing.assert_allclose(got[0], np.concatenate([w[0] for w in want]), rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(got[1], np.stack([w[1] for w in want]))


def test_map_alike_groups_at_most_fused_concat_operands(monkeypatch):
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', 3)
  calls = []

  def fn(x):
    calls.append(jnp.shape(x))
    return x + 1

  values = [selection.Lazy(jnp.abs, jnp.full((2, 4), float(i))) for i in range(7)]
  out = selection.map_alike(fn, values)
  # Chunks of 3, 2 and 2 (as equal as 3 chunks can be): vmapped calls of one jitted
  # function (selection._traced_once), traced once per chunk size.
  assert calls == [(2, 4), (2, 4)]
  for i, o in enumerate(out):
    np.testing.assert_array_equal(o, jnp.full((2, 4), i + 1.0))


def row_scaled(x, table, i):
  return x * table[i, 0] + table[i, 1]


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(n=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_lazy_values_reading_rows_of_a_shared_array(n, seed):
  # Alike values reading their rows of one Shared table are evaluated together with the
  # table unstacked (map_alike); each equals its own expression, and views (rows, samples,
  # the arrays a loop reads) leave the table whole.
  rng = np.random.default_rng(seed)
  table = selection.Shared(jnp.asarray(rng.standard_normal((n, 2)), jnp.float32))
  ws = [jnp.asarray(rng.standard_normal((4, 64)), jnp.float32) for _ in range(n)]
  values = [selection.Lazy(row_scaled, w, table, np.int32(i)) for i, w in enumerate(ws)]
  want = [
    np.asarray(w) * np.asarray(table.value)[i, 0] + np.asarray(table.value)[i, 1]
    for i, w in enumerate(ws)
  ]
  got = jax.jit(lambda: selection.map_alike(lambda x: x, values))()
  for i, v in enumerate(values):
    np.testing.assert_allclose(got[i], want[i], rtol=1e-6)
    np.testing.assert_allclose(selection.materialize(v), want[i], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v.rows()).reshape(-1), want[i].reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(v.strided_sample(5), want[i].reshape(-1)[::5], rtol=1e-6)
    seen = selection._lazy_arrays(v)  # what a loop or a stack reads: w and the index
    assert len(seen) == 2 and all(a is not table for a in seen)
  # One group: the values differ only in their arrays and share the table object.
  assert len(selection._alike_groups(values, max_members=n)) == 1
  other = selection.Lazy(row_scaled, ws[0], selection.Shared(table.value), np.int32(0))
  assert len(selection._alike_groups([values[0], other])) == 2  # another table object


def test_shared_rows_stay_whole_under_map_layers():
  # A stacked leaf of 3 layers of (4, 64): the table is not sliced with the layers.
  table = selection.Shared(jnp.array([[2.0, 1.0], [3.0, -1.0]]))
  w = jnp.arange(3 * 4 * 64, dtype=jnp.float32).reshape(3, 4, 64)
  x = selection.Lazy(row_scaled, w, table, np.int32(1))
  got = selection.map_layers(selection.materialize, 0, x)
  np.testing.assert_array_equal(got, w * 3.0 - 1.0)


def test_strategies_and_structures_without_lazy_still_work():
  @dataclasses.dataclass(frozen=True)
  class OldStrategy(strategies.PerLeaf):
    def masks(self, updater, scores, sparsities):  # written before lazy existed
      return super().masks(updater, scores, sparsities)

  @dataclasses.dataclass(frozen=True)
  class OldStructure(sparsity_types.Unstructured):
    def masks(self, scores, sparsities, axes):  # written before lazy existed
      return super().masks(scores, sparsities, axes)

  @dataclasses.dataclass(frozen=True)
  class Mine(prunax.MagnitudePruning):
    selection_strategy = OldStrategy()

  params = _params(3)
  for updater in (
    Mine(sparsity=0.5),
    prunax.MagnitudePruning(sparsity=0.5, sparsity_type=OldStructure()),
  ):
    tx = updater.wrap_optax(optax.sgd(0.0))
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    masks = prunax.bool_masks(state, params)
    assert all(int(m.sum()) == m.size // 2 for m in masks.values())


def test_accepts_keyword():
  assert _checks.accepts_keyword(lambda a, lazy=False: a, 'lazy')
  assert _checks.accepts_keyword(lambda a, **kw: a, 'lazy')
  assert not _checks.accepts_keyword(lambda a, b: a, 'lazy')


def test_an_own_compute_masks_is_what_the_engine_stores():
  @dataclasses.dataclass(frozen=True)
  class Halves(prunax.MagnitudePruning):
    def compute_masks(self, params, sparsities, sparse_state=None, grads=None, old_masks=None):
      return jax.tree.map(lambda s, p: None if s is None else p > 0, sparsities, params)

  params = _params(2, extra=False)
  updater = Halves(sparsity=0.5)
  targets = updater.target_sparsities(params)
  like = updater.store_masks(updater.init_masks(params, targets))
  stored = updater.store_masks(updater.new_masks(params, targets), like=like)
  got = masks_lib.unpack_masks(stored, params)
  for k, p in params.items():
    np.testing.assert_array_equal(got[k], p > 0)


def _lazies_for_sampling():
  key = jax.random.PRNGKey(3)
  w = jax.random.normal(key, (24, 64))
  g = jax.random.normal(jax.random.fold_in(key, 1), (24, 64))
  packed = masks_lib.pack_mask(w > 0.2)
  unaligned = masks_lib.pack_mask(w[:, :20] > 0)  # 8 blocks of 2.5 bytes: no word rows
  kept = masks_lib.lazy_mask(packed, w.shape)
  return [
    selection.Lazy(jnp.abs, w),
    selection.Lazy(lambda m, s: jnp.where(m, s, -1.0), kept, selection.Lazy(jnp.abs, g)),
    kept,
    masks_lib.lazy_mask(unaligned, (24, 20)),
    selection.Lazy(lambda a, b: a * b, w, jnp.float32(2.0)),  # a broadcast argument
    selection.Lazy(lambda a, b: a + b, w, jnp.ones((1, 1))),  # one that adds an axis
    selection.Lazy(lambda a: a[::-1], w, shape=w.shape),  # arguments not aligned
  ]


@pytest.mark.parametrize('stride', [1, 3, 7, 64])
def test_sampled_evaluates_to_every_stride_th_value(stride):
  for x in _lazies_for_sampling():
    want = np.asarray(selection.materialize(x)).reshape(-1)[::stride]
    np.testing.assert_array_equal(x.sampled(stride)(), want)
    np.testing.assert_array_equal(x.strided_sample(stride), want)


def test_samples_of_alike_inputs_are_computed_together(monkeypatch):
  k = jnp.int32(100)

  def growth():
    sizes = []
    for n in (2, 6):
      ws = [jax.random.normal(jax.random.PRNGKey(i), (64, 128)) for i in range(n)]
      fn = lambda ws: selection._sample_pivots_each(  # noqa: E731
        [selection.Lazy(jnp.abs, w) for w in ws], jnp.full(len(ws), k)
      )
      sizes.append(_eqns(fn, ws))
    return (sizes[1] - sizes[0]) / 4

  grouped = growth()
  monkeypatch.setattr(
    selection,
    '_map_alike_groups',
    lambda fn, xs: [([i], fn(selection.materialize(x)), False) for i, x in enumerate(xs)],
  )
  alone = growth()
  assert grouped < 0.6 * alone, (grouped, alone)


@pytest.mark.parametrize(
  'make',
  [
    lambda: prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0)),
    lambda: prunax.SteMagnitudePruning(sparsity=0.8),
  ],
  ids=['masked_training', 'straight_through'],
)
def test_both_engines_store_alike_masks_together(make, monkeypatch, request):
  def growth():
    sizes = []
    for n in (2, 6):
      params = _params(n, extra=False)
      tx = make().wrap_optax(optax.sgd(0.1))
      state = tx.init(params)
      grads = jax.tree.map(jnp.ones_like, params)
      sizes.append(_eqns(tx.update, grads, state, params))
    return (sizes[1] - sizes[0]) / 4

  grouped = growth()
  # The engines as before: every mask evaluated (and packed) on its own.
  monkeypatch.setattr(prunax.BaseUpdater, 'new_masks', prunax.BaseUpdater.compute_masks)
  alone = growth()
  # masked training: a leaf's threshold mask and packing (~95 equations against ~58);
  # straight-through: its packing only (the forward pass evaluates each mask anyway).
  margin = 20 if 'masked' in request.node.name else 4
  assert grouped < alone - margin, (grouped, alone)


_TRACED = []


def _recorded_abs(x):
  _TRACED.append(jnp.shape(x))
  return jnp.abs(x)


def test_a_search_traces_its_scores_once_for_every_chunk_of_alike_leaves(monkeypatch):
  # Six alike leaves in chunks of 2: the sample and the counting passes of the loop
  # read the chunks through one jitted function each, which JAX traces once for all three
  # chunks (and lowers once; XLA inlines the calls), so the traced program does not grow
  # with the number of chunks. Each chunk traced its own copy before (3 times as many).
  # The masks themselves are evaluated leaf by leaf (64 x 64, one trace a leaf): not
  # counted here.
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', 2)
  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.standard_normal((64, 64)), jnp.float32) for _ in range(6)]
  k = [409 + 37 * i for i in range(6)]

  def search_traces(n):
    _TRACED.clear()
    scores = lambda *ws: [selection.Lazy(_recorded_abs, w) for w in ws[:n]]
    out = jax.jit(lambda *ws: selection.topk_masks(scores(*ws), k[:n]))(*ws)
    traced = collections.Counter(_TRACED)
    traced[(64, 64)] -= n
    return +traced, out

  one_chunk, _ = search_traces(2)
  three_chunks, out = search_traces(6)
  assert one_chunk.total() >= 2 and three_chunks == one_chunk, (one_chunk, three_chunks)
  for w, m, n in zip(ws, out, k):
    np.testing.assert_array_equal(m, selection.topk_mask(jnp.abs(w), n))


def test_bool_masks_outside_jit_compile_one_program_once():
  # Read outside jit (a training loop logging its masks), the stored masks are unpacked
  # by one jitted program, kept across calls under the masks' signatures: the first call
  # compiles it and later ones compile nothing, where each call traced and compiled its
  # shared functions again (and the masks of one shape their operations once). The kept
  # program does not hold the masks it read.
  # A hand-written loop's hook (pre_forward_update) reads them so at every step.
  params = _params(3)
  updater = prunax.SET(sparsity=0.8)
  tx = updater.wrap_optax(optax.sgd(0.1))
  state = jax.jit(tx.init)(params)
  stored = prunax.get_sparse_state(state).masks
  jax.block_until_ready(state)
  with helpers.xla_compiles() as first:
    masks = prunax.bool_masks(state, params)
  with helpers.xla_compiles() as later:
    again = [prunax.bool_masks(state, params) for _ in range(2)]
  assert len(first) <= 1 and not later, (len(first), len(later))
  updater.pre_forward_update(params, state)
  with helpers.xla_compiles() as hooks:
    sparse = updater.pre_forward_update(params, state)
  assert not hooks, len(hooks)
  for name, p in params.items():
    np.testing.assert_array_equal(sparse[name], jnp.where(masks[name], p, 0))
  for m in [masks, *again]:
    for name, p in params.items():
      assert m[name].dtype == jnp.bool_ and m[name].shape == p.shape
      np.testing.assert_array_equal(m[name], masks_lib.unpack_mask(stored[name], p.shape))
  other = jax.jit(tx.init)(jax.tree.map(lambda p: p + 1.0, params))
  gone = weakref.ref(prunax.get_sparse_state(other).masks['l0'])
  prunax.bool_masks(other, params)
  del other
  assert gone() is None


def test_materialize_all_traces_alike_lazy_leaves_once():
  # The stored masks of a model's repeated kernels are unpacked (and lazy masks
  # evaluated) by one jitted function per signature: traced once for all of them, where
  # each leaf traced its own before. Other leaves pass as materialize leaves them.
  rng = np.random.default_rng(1)
  ws = [jnp.asarray(rng.standard_normal((8, 64)), jnp.float32) for _ in range(5)]
  odd = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)

  def evaluate(odd, *ws):
    tree = {
      'w': [selection.Lazy(_recorded_abs, w) for w in ws],
      'odd': selection.Lazy(_recorded_abs, odd),
      'array': odd,
      'none': None,
    }
    return selection.materialize_all(tree)

  _TRACED.clear()
  out = jax.jit(evaluate)(odd, *ws)
  assert sorted(_TRACED) == [(4, 32), (8, 64)], _TRACED
  assert out['none'] is None
  np.testing.assert_array_equal(out['array'], odd)
  np.testing.assert_array_equal(out['odd'], jnp.abs(odd))
  for w, o in zip(ws, out['w']):
    np.testing.assert_array_equal(o, jnp.abs(w))

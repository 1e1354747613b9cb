"""What a pruned step compiles: kernels of the selection loops, and no threefry rounds.

XLA's CPU backend compiles every distinct kernel separately (10-30 ms each on CPU), so
the number of kernels a mask update adds is most of its compile time
(``python -m benchmarks.compile_time``)."""

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import masks
from prunax import selection
from prunax import sparsity_schedules as sched
from tests.core.helpers import distinct_kernels
from tests.xla_env import compile_as_users


def loop_body_kernels(hlo: str) -> list[int]:
  """The number of fusions (kernels) in the body of every while loop of optimised HLO."""
  bodies = re.findall(r' while\(.*?body=%?([\w.\-]+)', hlo)
  counts = []
  for body in bodies:
    text = hlo[hlo.index(f'\n%{body} ') :]
    text = text[: text.index('\n}')]
    counts.append(len(re.findall(r' fusion\(', text)))
  return counts


def test_a_selection_loop_body_compiles_nine_kernels():
  # One pass: the tie searches started (3: a count read, their first pivots placed and
  # chosen), the pivots read (1), the count (1), the fields summed (3), and the brackets
  # narrowed with the next pivots placed (1). The brackets, counts and pivots held as
  # separate arrays, and narrowed with reductions and gathers, took 13; a second loop for
  # the ties, 6 more; a tie search started where the threshold's bracket closed, 16 in
  # all (the choice read every narrowed value and XLA split the bookkeeping).
  arrays = [jax.random.normal(jax.random.PRNGKey(i), (256, 256)) for i in range(4)]

  def masks(*xs):
    return selection.topk_masks([selection.Lazy(jnp.abs, x) for x in xs], [6000] * 4)

  hlo = compile_as_users(jax.jit(masks).lower(*arrays)).as_text()
  counts = loop_body_kernels(hlo)
  assert len(counts) == 1 and counts[0] <= 9, counts  # one loop: thresholds and ties
  got = jax.jit(masks)(*arrays)
  for x, m in zip(arrays, got, strict=True):
    order = np.argsort(-np.abs(np.asarray(x)).reshape(-1), kind='stable')[:6000]
    want = np.zeros(x.size, bool)
    want[order] = True
    np.testing.assert_array_equal(np.asarray(m).reshape(-1), want)


def test_random_scores_of_a_mask_update_use_no_threefry():
  # SET's grow scores are hashes; their per-step and per-leaf keys were threefry
  # fold_in/split, which compile as while loops (21 of 127 kernels of a 4-layer step).
  params = {f'l{i}': {'w': jnp.ones((64, 64))} for i in range(3)}
  tx = prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10)).wrap_optax(
    optax.sgd(0.1)
  )
  state = tx.init(params)
  jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params))
  for primitive in ('random_fold_in', 'random_split', 'threefry2x32'):
    assert primitive not in jaxpr
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(params, state, params).as_text()
  assert 'threefry' not in hlo


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  key=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
  counts=st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=40, unique=True),
  salt=st.integers(0, 7),
)
def test_fold_key_is_distinct_per_count_and_broadcasts(key, counts, salt):
  key = jnp.array(key, jnp.uint32)
  many = np.asarray(selection.fold_key(key, jnp.array(counts, jnp.int32), salt))
  assert many.shape == (len(counts), 2) and many.dtype == np.uint32
  # Distinct counts give distinct keys (the fold is a bijection of the first word).
  assert len({tuple(k) for k in many}) == len(counts)
  assert len(set(many[:, 0].tolist())) == len(counts)
  for c, k in zip(counts, many, strict=True):
    np.testing.assert_array_equal(np.asarray(selection.fold_key(key, c, salt)), k)
  # Keyed: another key, or another salt, gives other keys.
  other = np.asarray(selection.fold_key(key ^ jnp.uint32(1), counts[0], salt))
  assert tuple(other) != tuple(many[0])
  assert tuple(np.asarray(selection.fold_key(key, counts[0], salt + 1))) != tuple(many[0])


def _step_kernels(tx, params) -> int:
  """Distinct kernels (``distinct_kernels``) of a jitted ``tx.update`` on ``params``."""
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  return distinct_kernels(compile_as_users(step.lower(params, tx.init(params), params)))


@pytest.mark.parametrize('algorithm', [prunax.SET, prunax.RigL])
def test_alike_leaves_share_their_kernels(algorithm):
  # The leaves' RNG keys and thresholds are rows of shared arrays, each read inside the
  # kernels of its group (selection.Shared), and the bit shifts of packed masks are an
  # iota computed inside the kernels (masks._row_shifts): a second and third group of 8
  # alike leaves compile the first group's kernels again, adding only a few of the
  # grouped store's. Each leaf reading its own row (a constant slice) added 23-24
  # distinct kernels for 16 more leaves; the shifts as a constant array, an operand that
  # XLA ordered differently in the last group's kernels, added 7-9 for the second group.
  tx = algorithm(
    sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10), drop_fraction_fn='constant'
  ).wrap_optax(optax.sgd(0.1))
  counts = []
  for n in (8, 16, 24):
    params = {f'l{i}': jnp.full((64, 64), 1.0 + i) for i in range(n)}
    counts.append(_step_kernels(tx, params))
  assert counts[1] - counts[0] <= 4 and counts[2] - counts[1] <= 2, counts


def test_a_packed_mask_is_unpacked_in_few_instructions():
  # Every kernel that reads a packed mask unpacks it (the optimizer's kernels of every
  # pruned leaf, twice for the masks before and after a step). As ((byte << i) >= 128) a
  # mask applied to a weight is a kernel of 12 instructions; as ((byte >> (7 - i)) & 1)
  # != 0 it was 19.
  def apply(packed, w):
    return jnp.where(masks.unpack_mask(packed, w.shape), w, 0.0)

  packed = masks.pack_mask(jnp.ones((256, 256), bool))
  text = compile_as_users(jax.jit(apply).lower(packed, jnp.ones((256, 256)))).as_text()
  kernels = re.findall(r'^%fused_computation[^\n]*\{\n(.*?)\n\}', text, re.S | re.M)
  assert [k.count('\n') + 1 for k in kernels] == [12], kernels


@pytest.mark.parametrize('algorithm', [prunax.SET, prunax.MagnitudePruning])
def test_twelve_alike_leaves_compile_the_kernels_of_six(algorithm):
  # 12 alike leaves (a transformer's blocks) are stacked in two chunks of 6, whose kernels
  # are identical, so they compile what 6 leaves do and the grouped store's slices of a
  # second chunk. As chunks of 8 and 4 every kernel over a stack was compiled twice: 22
  # more distinct kernels than for 6 leaves in a SET update, 13 in magnitude pruning's.
  kwargs = {'drop_fraction_fn': 'constant'} if algorithm is prunax.SET else {}
  tx = algorithm(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10), **kwargs).wrap_optax(
    optax.sgd(0.1)
  )
  counts = []
  for n in (6, 12):
    params = {f'l{i}': jnp.full((64, 64), 1.0 + i) for i in range(n)}
    counts.append(_step_kernels(tx, params))
  assert counts[1] - counts[0] <= 4, counts


@pytest.mark.parametrize('algorithm', [prunax.SET, prunax.MagnitudePruning])
def test_samples_of_alike_leaves_of_several_shapes_are_padded_together(algorithm):
  # The search samples every leaf and pads the samples to one length for one sort. Alike
  # leaves' samples are padded as one stacked array (selection._sample_pivots_each):
  # what 12 more leaves of 3 shapes add is, per shape, the slices of the larger groups'
  # packed masks (1 kernel per added leaf). With each sample padded on its own, the 12
  # leaves added 40 distinct kernels to a SET update (2 samples per step), 24 to magnitude.
  kwargs = {'drop_fraction_fn': 'constant'} if algorithm is prunax.SET else {}
  tx = algorithm(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10), **kwargs).wrap_optax(
    optax.sgd(0.1)
  )
  shapes = [(64, 64), (64, 96), (32, 160)]
  counts = []
  for n in (2, 6):
    params = {
      f'l{s}_{i}': jnp.full(shape, 1.0 + i) for s, shape in enumerate(shapes) for i in range(n)
    }
    counts.append(_step_kernels(tx, params))
  assert counts[1] - counts[0] <= 12, counts


def test_straight_through_forward_reads_thresholds_without_a_kernel_per_leaf():
  # The forward pass evaluates every leaf's mask on its own, reading its threshold as one
  # output of the kernel that splits the thresholds (_xla_workarounds.split_rows): 16
  # more leaves of one shape add the kernels of 2 more selection groups and of the
  # grouped store's slices, not one per leaf. A gather per leaf made them add 31.
  tx = prunax.SteMagnitudePruning(sparsity=0.8).wrap_optax(optax.sgd(0.1))
  counts = []
  for n in (4, 20):
    params = {f'l{i}': jnp.full((64, 64), 1.0 + i) for i in range(n)}
    counts.append(_step_kernels(tx, params))
  assert counts[1] - counts[0] <= 20, counts


def test_a_step_without_mask_update_moves_about_the_dense_bytes():
  # XLA's cost model of the compiled step (bytes accessed: operands and results of every
  # kernel), deterministic where timings on a shared CPU are not: the target for
  # steps without a mask update is 1.03x the dense step. Packed masks add 1/32 of the
  # weights' bytes (1.012x here); uint8 masks, a quarter (1.095x).
  params = {
    f'l{i}': {
      'kernel': jax.random.normal(jax.random.PRNGKey(i), (256, 256)),
      'bias': jnp.zeros(256),
    }
    for i in range(4)
  }
  x = jnp.ones((8, 256))

  def loss(p):
    h = x
    for i in range(4):
      h = jnp.tanh(h @ p[f'l{i}']['kernel'] + p[f'l{i}']['bias'])
    return jnp.mean(h**2)

  def bytes_accessed(tx):
    def step(p, s):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s

    compiled = compile_as_users(jax.jit(step).lower(params, tx.init(params)))
    return compiled.cost_analysis()['bytes accessed']

  dense = bytes_accessed(optax.adam(1e-3))
  ratios = {
    packed: bytes_accessed(
      prunax.MagnitudePruning(
        sparsity=0.9, scheduler=sched.NoUpdateSchedule(), packed_masks=packed
      ).wrap_optax(optax.adam(1e-3))
    )
    / dense
    for packed in (True, False)
  }
  assert 1.0 < ratios[True] <= 1.03, ratios
  assert ratios[False] > ratios[True] + 0.05, ratios  # the model sees the masks' bytes


def _most_concatenated(compiled) -> int:
  """The most operands of any concatenation in an optimised module (fused or not)."""
  return max(
    (
      line.split('concatenate(', 1)[1].split(')', 1)[0].count('%')
      for line in compiled.as_text().splitlines()
      if ' concatenate(' in line
    ),
    default=0,
  )


@pytest.mark.parametrize(
  'updater',
  [
    prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.PolynomialSchedule(1, 0, 10)),
    prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10)),
  ],
  ids=['magnitude', 'set'],
)
def test_a_count_shared_by_every_leaf_is_not_stacked_per_leaf(updater):
  # 24 leaves of one size at one sparsity share one traced count (once_per_value: the
  # schedule's sparsity, SET's decaying drop fraction); stacked once per leaf it was a
  # concatenation of 24 operands, a kernel of its own that grows with the leaves (10-15 ms
  # of LLVM time at 64 leaves on CPU, once per selection loop: python -m
  # benchmarks.compile_kernels). As one broadcast it compiles no kernel.
  tx = updater.wrap_optax(optax.sgd(0.1))
  params = {f'l{i}': jnp.full((64, 64), 1.0 + i) for i in range(24)}
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  compiled = compile_as_users(step.lower(params, tx.init(params), params))
  assert _most_concatenated(compiled) < 24


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  picks=st.lists(st.integers(0, 3), min_size=1, max_size=12),
  dtype=st.sampled_from([None, jnp.int32, jnp.float32]),
)
def test_stack_shared_equals_a_plain_stack(picks, dtype):
  # Leaves share values by identity: the same object at several positions.
  values = [jnp.int32(7), jnp.int32(-3), jnp.array(11, jnp.int32), 5]
  chosen = [values[i] for i in picks]
  got = selection.stack_shared(chosen, dtype)
  want = jnp.stack([jnp.asarray(v, dtype) for v in chosen])
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

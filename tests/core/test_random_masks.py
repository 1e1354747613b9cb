"""Random initial masks by a keyed permutation (prunax.random_masks).

The permutation is checked against a numpy transcription of the swap-or-not shuffle
(Hoang, Morris, Rogaway 2012), for being a bijection, and for statistics: the kept positions
of many keys must be as uniform and as pairwise independent as exact uniform draws (a
check that rejects the same shuffle with too few rounds). Sparse training's init (SET,
RigL, static random) must keep exact counts per leaf and per layer, draw alike leaves in
one computation, and give the same masks jitted and eager.
"""

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
from prunax import engines
from prunax import random_masks
from prunax import sparsity_schedules as sched
from prunax import sparsity_types
from tests.xla_env import compile_as_users


def _mix32(x):
  # "lowbias32" (C. Wellons), transcribed for uint32 numpy arrays.
  x = x ^ (x >> np.uint32(16))
  x = (x * np.uint32(0x7FEB352D)).astype(np.uint32)
  x = x ^ (x >> np.uint32(15))
  x = (x * np.uint32(0x846CA68B)).astype(np.uint32)
  return x ^ (x >> np.uint32(16))


def reference_permutation(n, keys, positions=None):
  """Swap-or-not, one position at a time (Python integers): round r pairs x with K_r - x
  (mod n) and swaps when the round's bit of max(x, partner) is set."""
  out = []
  with np.errstate(over='ignore'):
    for x in range(n) if positions is None else positions:
      for offset, hash_key in np.asarray(keys, np.uint32):
        partner = (int(offset) % n - x) % n
        bit = int(_mix32(np.uint32(max(x, partner)) ^ hash_key)) >> 31
        x = partner if bit else x
      out.append(x)
  return np.array(out)


def key_words(*seeds):
  return jnp.asarray(np.array(seeds, np.uint32).reshape(-1, 2))


@pytest.mark.parametrize('n', [1, 2, 7, 64, 100])
def test_permutation_matches_the_transcription(n):
  keys = random_masks.round_keys(key_words(3, n))[0]
  got = random_masks.permute(jnp.arange(n, dtype=jnp.uint32), n, keys)
  np.testing.assert_array_equal(np.asarray(got), reference_permutation(n, keys))


def test_the_largest_domain_does_not_overflow():
  n = random_masks.MAX_POSITIONS
  positions = [0, 1, 2, n // 2, n - 2, n - 1]
  keys = random_masks.round_keys(key_words(11, 12))[0]
  got = np.asarray(random_masks.permute(jnp.asarray(positions, jnp.uint32), n, keys))
  np.testing.assert_array_equal(got, reference_permutation(n, keys, positions))
  assert len(set(got.tolist())) == len(positions) and got.max() < n


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1), k=st.integers(0, 5000))
def test_permutation_is_a_bijection_and_keeps_exact_counts(n, seed, k):
  keys = random_masks.round_keys(key_words(seed, 1))[0]
  perm = np.asarray(random_masks.permute(jnp.arange(n, dtype=jnp.uint32), n, keys))
  np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  mask = random_masks.keep_mask((n,), k, keys)
  assert int(mask.sum()) == min(k, n)


@pytest.mark.parametrize('n', [1, 2, 3])
def test_tiny_domains_compile_with_traced_keys(n):
  # n = 1 failed to compile (XLA's simplifier looped on the rounds modulo 1).
  # Compiled as users compile (the suite's XLA flags compiled it).
  keys = random_masks.round_keys(key_words(4, n))[0]
  index = jnp.arange(n, dtype=jnp.uint32)
  permute = jax.jit(lambda kk: random_masks.permute(index, n, kk)).lower(keys)
  got = compile_as_users(permute)(keys)
  np.testing.assert_array_equal(np.asarray(got), reference_permutation(n, keys))
  mask = compile_as_users(jax.jit(lambda kk: random_masks.keep_mask((n,), 1, kk)).lower(keys))
  assert int(mask(keys).sum()) == 1


@pytest.mark.parametrize(
  'make',
  [
    lambda: prunax.SET(sparsity=0.5, scheduler=sched.PeriodicSchedule(10, 0, 100)),
    lambda: prunax.StaticRandomSparse(sparsity=0.95),
  ],
)
def test_a_one_weight_leaf_keeps_its_weight(make):
  params = {'w': jnp.ones((1, 1)), 'k': jnp.ones((4, 8))}
  updater = make()
  init = compile_as_users(engines._jitted_init_state.lower(updater, params, None))
  state = init(params, None)
  masks = jax.tree.map(np.asarray, prunax.state.bool_masks(state, params))
  assert int(masks['w'].sum()) == 1  # a pruned leaf keeps at least one weight
  assert int(masks['k'].sum()) == 32 - int(np.round(np.float32(updater.sparsity) * 32))


def test_permute_rejects_a_domain_it_cannot_hold():
  keys = random_masks.round_keys(key_words(0, 0))[0]
  with pytest.raises(ValueError, match=r'n=0 positions; valid: 1 <= n <= 2147483647'):
    random_masks.permute(jnp.zeros(3, jnp.uint32), 0, keys)


def draws(n, k, trials, rounds):
  keys = random_masks.round_keys(key_words(*np.stack([np.arange(trials), np.full(trials, 5)], 1)))
  keys = keys[:, :rounds]
  return np.asarray(jax.jit(jax.vmap(lambda kk: random_masks.keep_mask((n,), k, kk)))(keys))


def uniformity_statistics(masks, k):
  """Mean squared z-scores of every position's keep frequency and of every pair's joint
  keep frequency, against exact uniform k-of-n draws (about 1 for such draws)."""
  trials, n = masks.shape
  p, pair = k / n, k * (k - 1) / (n * (n - 1))
  single = (masks.mean(0) - p) / np.sqrt(p * (1 - p) / trials)
  m = masks.astype(np.float32)
  joint = (m.T @ m / trials)[np.triu_indices(n, 1)]
  pairs = (joint - pair) / np.sqrt(pair * (1 - pair) / trials)
  return float(np.mean(single**2)), float(np.mean(pairs**2))


def test_kept_positions_are_uniform_and_pairwise_independent():
  n, k, trials = 100, 10, 20000
  single, pairs = uniformity_statistics(draws(n, k, trials, random_masks.ROUNDS), k)
  assert 0.7 < single < 1.3 and 0.9 < pairs < 1.1, (single, pairs)
  # The check has power: the same shuffle with a quarter of the rounds fails it.
  weak = uniformity_statistics(draws(n, k, trials, random_masks.ROUNDS // 4), k)
  assert weak[0] > 1.3 or weak[1] > 1.1, weak


def test_a_large_leaf_spreads_its_kept_weights_like_a_uniform_draw():
  # Rows of a 256 x 256 leaf at 90% sparsity hold hypergeometric counts of kept weights.
  n, k, trials = 65536, 6554, 64
  rows = draws(n, k, trials, random_masks.ROUNDS).reshape(trials, 256, 256).sum(-1)
  mean = 256 * k / n
  var = 256 * (k / n) * (1 - k / n) * (n - 256) / (n - 1)
  assert abs(rows.mean() - mean) < 1e-9
  assert 0.9 < rows.var() / var < 1.1, rows.var() / var


def mlp(layers, width=32):
  return {
    f'layer{i}': {'kernel': jnp.ones((width, width)), 'bias': jnp.zeros(width)}
    for i in range(layers)
  }


def stored_masks(updater, params):
  state = updater.wrap_optax(optax.sgd(0.1)).init(params)
  return jax.tree.map(np.asarray, prunax.state.bool_masks(state, params))


@pytest.mark.parametrize(
  'make',
  [
    lambda: prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(10, 0, 100)),
    lambda: prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(10, 0, 100)),
    lambda: prunax.StaticRandomSparse(sparsity=0.8),
  ],
)
def test_sparse_training_starts_from_exact_distinct_random_masks(make):
  params = mlp(6)
  masks = stored_masks(make(), params)
  kernels = [masks[f'layer{i}']['kernel'] for i in range(6)]
  want = 32 * 32 - int(np.round(np.float32(0.8) * np.float32(32 * 32)))
  assert [int(m.sum()) for m in kernels] == [want] * 6
  assert len({m.tobytes() for m in kernels}) == 6  # each leaf its own draw


def test_alike_leaves_are_drawn_together():
  # 16 leaves of one shape: the rounds are traced once per group of alike leaves (a
  # group of at most 8 is evaluated together), not once per leaf.
  params = mlp(16)
  updater = prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(10, 0, 100))
  jaxpr = jax.make_jaxpr(engines._jitted_init_state, static_argnums=0)(updater, params, None)

  def calls_in(j):
    for e in j.eqns:
      if e.params.get('name') == '_keep_at':
        yield e
      else:
        for sub in jax.extend.core.jaxprs_in_params(e.params):
          yield from calls_in(sub)

  calls = list(calls_in(jaxpr.jaxpr))
  assert len(calls) == 2
  assert [e.outvars[0].aval.shape for e in calls] == [(8, 32, 32)] * 2


def test_jitted_and_eager_init_draw_the_same_masks():
  params = mlp(3)
  updater = prunax.SET(sparsity=0.7, scheduler=sched.PeriodicSchedule(10, 0, 100))
  jitted = engines._jitted_init_state(updater, params, None).masks
  with jax.disable_jit():
    eager = updater.init_state(params).masks
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_seed_changes_the_masks():
  params = mlp(1)
  a, b, c = (
    stored_masks(prunax.StaticRandomSparse(sparsity=0.5, seed=s), params)['layer0']['kernel']
    for s in (0, 0, 1)
  )
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_every_layer_of_a_stacked_leaf_gets_its_own_exact_draw():
  params = {'layers': {'kernel': jnp.ones((4, 16, 24))}, 'head': jnp.ones((24, 5))}
  updater = prunax.StaticRandomSparse(sparsity=0.75, layer_axes={'layers/kernel': 0})
  masks = stored_masks(updater, params)
  stack = masks['layers']['kernel']
  assert [int(m.sum()) for m in stack] == [16 * 24 // 4] * 4
  assert len({m.tobytes() for m in stack}) == 4
  assert int(masks['head'].sum()) == 24 * 5 - int(np.round(np.float32(0.75) * 120))


def test_structured_random_masks_keep_their_structure():
  # N:M is not a permutation's job: those masks still come from random scores.
  params = mlp(2, width=16)
  updater = prunax.StaticRandomSparse(sparsity=0.5, sparsity_type=sparsity_types.NByM(2, 4))
  kernel = stored_masks(updater, params)['layer0']['kernel']
  groups = np.moveaxis(kernel, 0, -1).reshape(16, 4, 4)  # N:M along the input axis
  assert (groups.sum(-1) == 2).all()


def test_initial_masks_of_the_jaxpruner_api_are_arrays():
  params = mlp(2)
  updater = prunax.StaticRandomSparse(sparsity=0.8)
  masks = updater.get_initial_masks(params, updater.target_sparsities(params))
  kernel = masks['layer0']['kernel']
  assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.uint8
  assert int(kernel.sum()) == 32 * 32 - 819


def test_leaves_beyond_the_permutation_domain_keep_the_scores_path(monkeypatch):
  # A layer of more than MAX_POSITIONS weights (2**31 - 1: an 8 GB float32 layer) is drawn as
  # the top k of random scores; shown here with the limit lowered to 1000 weights.
  monkeypatch.setattr(random_masks, 'MAX_POSITIONS', 1000)
  params = mlp(2)  # 1024 weights per kernel
  updater = prunax.StaticRandomSparse(sparsity=0.8)
  jaxpr = jax.make_jaxpr(engines._jitted_init_state, static_argnums=0)(updater, params, None)
  assert '_keep_at' not in str(jaxpr) and 'sort' in str(jaxpr)  # small: sorted scores
  kernel = stored_masks(updater, params)['layer0']['kernel']
  assert int(kernel.sum()) == 1024 - 819


def _init_compiled(updater, params):
  return compile_as_users(
    jax.jit(engines._jitted_init_state, static_argnums=0).lower(updater, params, None)
  )


def _largest_kernel(compiled) -> int:
  """Instructions of the largest fused computation of an optimised module."""
  bodies = re.findall(r'^%fused_computation[^\n]*\{\n(.*?)\n\}', compiled.as_text(), re.S | re.M)
  return max(body.count('\n') + 1 for body in bodies)


def test_the_rounds_run_in_a_loop_unless_the_positions_would_not_fit(monkeypatch):
  # Up to LOOP_MAX_POSITIONS weights, the permutation's rounds run in a while loop, so
  # XLA compiles one round: unrolled, the 24 rounds were one fused kernel of about 600
  # instructions per group of alike leaves. Beyond it they are unrolled again, so that
  # no position is stored (the loop keeps 4 bytes a weight between rounds). Both draw
  # the same masks.
  params = mlp(4, width=64)  # 4 kernels of 4096 weights: 16384 positions in all
  updater = prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(10, 0, 100))
  looped = _init_compiled(updater, params)
  rounds = re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', looped.as_text())
  assert str(random_masks.ROUNDS) in rounds, rounds
  assert _largest_kernel(looped) < 150
  masks = stored_masks(updater, params)

  monkeypatch.setattr(random_masks, 'LOOP_MAX_POSITIONS', 16383)
  jax.clear_caches()  # the limit is read when the init is traced
  unrolled = _init_compiled(updater, params)
  assert ' while(' not in unrolled.as_text()
  assert _largest_kernel(unrolled) > 24 * 15  # the 24 rounds in one kernel
  # What the loop keeps between rounds: a position per weight. Unrolled, only the packed
  # masks (a bit per weight) and the keys remain.
  positions = 4 * 16384
  assert looped.memory_analysis().temp_size_in_bytes >= positions
  assert unrolled.memory_analysis().temp_size_in_bytes < positions // 8
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(stored_masks(updater, params))):
    np.testing.assert_array_equal(a, b)

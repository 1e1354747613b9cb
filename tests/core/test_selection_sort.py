"""Small arrays are selected by sorting: no search loop compiled, the same masks.

Arrays of at most ``selection._SORT_AT_MOST`` elements (per leaf, or all leaves together
for one global threshold) take one stable sort of their keys instead of the search
loops. The masks must be the ones the search gives (and a stable sort's reference):
ties kept by lowest position, NaN and -inf last, exact counts, mixed with large arrays
in one call.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import selection
from prunax import sparsity_schedules as sched
from tests.core.helpers import make_step
from tests.core.helpers import mlp_params
from tests.core.test_selection import KINDS
from tests.core.test_selection import make_scores
from tests.core.test_selection import reference_masks

LIMIT = selection._SORT_AT_MOST


def primitives(fn, *args) -> set[str]:
  """Names of the primitives in ``fn``'s jaxpr, nested jaxprs included."""

  def visit(jaxpr, found):
    for e in jaxpr.eqns:
      found.add(e.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        visit(sub, found)
    return found

  return visit(jax.make_jaxpr(fn)(*args).jaxpr, set())


def scores(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_small_arrays_compile_a_sort_and_no_loop():
  small, large = scores((64, LIMIT // 64)), scores((64, LIMIT // 64 + 1))
  per_leaf = lambda *xs: selection.topk_masks(list(xs), [10] * len(xs))
  shared = lambda *xs: selection.global_topk_masks(list(xs), 10)
  assert 'while' not in primitives(per_leaf, small, small)
  assert 'sort' in primitives(per_leaf, small, small)
  assert 'while' in primitives(per_leaf, small, large)
  assert 'while' not in primitives(shared, small[:32])  # half the limit together
  assert 'while' in primitives(shared, small, scores((3,)))  # LIMIT + 3 together


def test_a_pruned_small_model_steps_without_search_loops():
  # A step of a small MLP (every leaf at most 32 x 32) has no while loop: its masks, at
  # init and at every update, come from sorts.
  for updater in (
    prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.OneShotSchedule(0)),
    prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 0, 10)),
  ):
    params = mlp_params(sizes=(32, 32, 32))
    tx = updater.wrap_optax(optax.adam(1e-3))
    batch = (jnp.zeros((4, 32)), jnp.zeros((4, 32)))
    found = primitives(make_step(tx), params, tx.init(params), batch)
    assert 'while' not in found and 'sort' in found, type(updater).__name__


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
  kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4),
  fractions=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
  seed=st.integers(0, 2**16),
)
def test_sorted_masks_are_the_searched_masks(sizes, kinds, fractions, seed):
  # Ties (few values, mostly zero), NaN, -inf and subnormals; k from 0 to n; per leaf
  # and with one threshold for all.
  rng = np.random.default_rng(seed)
  arrays = [make_scores(kind, (n,), rng) for n, kind in zip(sizes, kinds)]
  ks = tuple(round(f * n) for f, n in zip(fractions, sizes))
  total = round(fractions[-1] * sum(sizes))
  per_leaf = jax.jit(selection.topk_masks, static_argnums=1)
  shared = jax.jit(selection.global_topk_masks)

  def both():
    xs = [jnp.asarray(a) for a in arrays]
    return per_leaf(xs, ks), shared(xs, total)

  sorted_masks = both()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(selection, '_SORT_AT_MOST', 0)
    per_leaf, shared = (
      jax.jit(selection.topk_masks, static_argnums=1),
      jax.jit(selection.global_topk_masks),
    )
    searched = both()
  for a, k, got, want in zip(arrays, ks, sorted_masks[0], searched[0], strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), reference_masks([a], k)[0])
  for got, want, ref in zip(
    sorted_masks[1], searched[1], reference_masks(arrays, total), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize('kind', ['few_values', 'special'])
def test_mixed_small_and_large_arrays_keep_their_order(kind):
  # Sorted and searched leaves interleaved, small ones of two sizes: each mask is its own
  # leaf's (a permutation mix-up would hand a leaf another's threshold).
  rng = np.random.default_rng(3)
  shapes = [(LIMIT + 32,), (7, 13), (LIMIT + 1,), (5,), (7, 13), (3, 40)]
  arrays = [make_scores(kind, s, rng) for s in shapes]
  ks = (LIMIT // 2, 90, 1, 5, 3, 77)
  got = jax.jit(selection.topk_masks, static_argnums=1)([jnp.asarray(a) for a in arrays], ks)
  for a, k, g in zip(arrays, ks, got, strict=True):
    np.testing.assert_array_equal(np.asarray(g), reference_masks([a], k)[0])


def test_traced_counts_and_lazy_masks_on_the_sorted_path():
  x = scores((20, 30), seed=4)
  lazy = jax.jit(lambda x, k: selection.topk_mask(selection.Lazy(jnp.abs, x), k, lazy=True)())
  for k in (0, 1, 299, 600):
    np.testing.assert_array_equal(
      np.asarray(lazy(x, jnp.int32(k))), reference_masks([np.abs(np.asarray(x))], k)[0]
    )

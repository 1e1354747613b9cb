"""One selection for many leaves: ``selection.topk_masks`` against per-leaf ``topk_mask``,
and the number of selection loops of a compiled step, which must not grow with the leaves."""

import hypothesis
import hypothesis.strategies as st
import jax
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
  got = selection.topk_masks(arrays, [int(k) for k in counts])
  for a, k, g in zip(arrays, counts, got, strict=True):
    want = selection.topk_mask(a, int(k))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want), err_msg=f'k={k} of {a.size}')
    assert int(np.asarray(g).sum()) == k


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
      want = selection.topk_mask(jnp.abs(x), k)
    else:
      want = selection.map_layers(lambda y, k=k: selection.topk_mask(jnp.abs(y), k), a, x)
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


def test_magnitude_step_has_two_loops():
  # A threshold loop and a tie-break loop, for all leaves together.
  updater = prunax.MagnitudePruning(sparsity=0.8, scheduler=sched.OneShotSchedule(0))
  assert loops(updater, 7) == 2

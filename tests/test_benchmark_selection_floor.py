"""`benchmarks.selection_floor`: its host selection gives the library's masks."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import prunax
from benchmarks import selection_floor
from prunax import selection
from prunax import sparsity_schedules as sched

SHAPES = [(40, 64), (3000,)]  # both searched (above selection._SORT_AT_MOST elements)


def _masks(scores, ks):
  return selection.topk_masks([selection.Lazy(jnp.abs, s) for s in scores], list(ks))


LIBRARY = jax.jit(_masks)


def _host_masks(scores, ks):
  with selection_floor.host_selection():
    return _masks(scores, ks)


HOST = jax.jit(_host_masks)


@settings(max_examples=12, deadline=None)
@example(values=1, seed=0, fractions=(0.9, 0.5))  # most keys at the lowest one, kept too
@given(
  values=st.integers(1, 400),
  seed=st.integers(0, 2**31 - 1),
  fractions=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
)
def test_host_thresholds_give_the_searched_masks(values, seed, fractions):
  # Scores of `values` distinct magnitudes: from all tied to nearly distinct, so the
  # host's ties (kept by lowest position) meet the search's tie-break.
  rng = np.random.default_rng(seed)
  scores = [jnp.asarray(rng.integers(-values, values + 1, s).astype(np.float32)) for s in SHAPES]
  ks = [jnp.int32(round(f * np.prod(s))) for f, s in zip(fractions, SHAPES, strict=True)]
  expected = LIBRARY(scores, ks)
  got = HOST(scores, ks)
  for e, g, k in zip(expected, got, ks, strict=True):
    assert int(g.sum()) == int(k)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_host_selection_trains_as_the_library():
  # SET (distinct grow keys, a tie-broken drop) and RigL, a mask update at every step:
  # the same params and masks after three steps.
  params = {'a': jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64), 'b': jnp.ones((64, 32)) * 0.5}
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 64))

  def loss(p):
    return jnp.mean(jnp.tanh(x @ p['a']) @ p['b'])

  for updater in (
    prunax.SET(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10)),
    prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 0, 10)),
  ):
    runs = []
    for host in (False, True):
      with selection_floor.host_selection() if host else contextlib.nullcontext():
        tx = updater.wrap_optax(optax.adam(1e-2))

        @jax.jit
        def step(p, s, tx=tx):
          u, s = tx.update(jax.grad(loss)(p), s, p)
          return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for _ in range(3):
          p, s = step(p, s)
        runs.append((p, prunax.bool_masks(s, p)))
    (p0, m0), (p1, m1) = runs
    for name in params:
      np.testing.assert_array_equal(np.asarray(m1[name]), np.asarray(m0[name]))
      np.testing.assert_array_equal(np.asarray(p1[name]), np.asarray(p0[name]))
    assert int(m0['a'].sum()) == round(0.2 * 4096)


def test_the_benchmark_prints_a_row_per_algorithm(capsys):
  selection_floor.main(['--layers', '2', '--algorithms', 'magnitude', '--repeats', '1'])
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith('| MLP')]
  assert len(rows) == 1
  cells = [c.strip() for c in rows[0].strip('|').split('|')]
  assert cells[:2] == ['MLP, 2 layers', 'magnitude'] and float(cells[2]) > 0
  for cell in cells[3:]:
    assert all(float(v) > 0 for v in cell.split(' / '))

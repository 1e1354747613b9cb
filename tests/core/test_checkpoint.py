"""Orbax save/restore of the optimizer state mid-schedule resumes bit-identically."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import prunax
from prunax import sparsity_schedules as sched
from tests.core.helpers import make_batch
from tests.core.helpers import make_step
from tests.core.helpers import mlp_params

UPDATERS = {
  'magnitude': lambda: prunax.MagnitudePruning(
    sparsity=0.8, scheduler=sched.PolynomialSchedule(2, 0, 8)
  ),
  'ste_packed': lambda: prunax.SteMagnitudePruning(
    sparsity=0.7, packed_masks=True, scheduler=sched.PolynomialSchedule(2, 0, 8)
  ),
  'rigl': lambda: prunax.RigL(
    sparsity=0.8, sparsity_distribution_fn='erk', scheduler=sched.PeriodicSchedule(2, 1)
  ),
  'random': lambda: prunax.RandomPruning(sparsity=0.8, scheduler=sched.PolynomialSchedule(2, 0, 8)),
}


@pytest.mark.parametrize('name', sorted(UPDATERS))
def test_resume_is_bit_identical(tmp_path, name):
  updater = UPDATERS[name]()
  tx = updater.wrap_optax(optax.adamw(1e-2, weight_decay=1e-3))
  step = jax.jit(make_step(tx))
  batch = make_batch()
  params = mlp_params()
  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state, batch)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', {'params': params, 'opt_state': state})
  # Uninterrupted run.
  p_ref, s_ref = params, state
  for _ in range(6):
    p_ref, s_ref = step(p_ref, s_ref, batch)
  # Resume into a fresh abstract target (as a restarted job would).
  target = jax.eval_shape(lambda: {'params': mlp_params(), 'opt_state': tx.init(mlp_params())})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'ckpt', target)
  assert isinstance(restored['opt_state'], prunax.SparseState)
  assert int(restored['opt_state'].count) == 5
  p, s = restored['params'], restored['opt_state']
  for _ in range(6):
    p, s = step(p, s, batch)
  jax.tree.map(np.testing.assert_array_equal, p_ref, p)
  jax.tree.map(
    np.testing.assert_array_equal,
    prunax.get_sparse_state(s_ref).masks,
    prunax.get_sparse_state(s).masks,
  )

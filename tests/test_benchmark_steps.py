"""The steps `python -m benchmarks.run` and `benchmarks.algorithm_steps` time."""

import jax
import jax.numpy as jnp
import optax
import pytest

import prunax
from benchmarks import run
from prunax import sparsity_schedules as sched


@pytest.mark.parametrize('kind', list(run.KINDS))
def test_timed_steps_are_the_steps_training_runs(kind):
  # Mask updates (and every-step selections) are timed as training runs them: the step
  # counter never reset, each timed update UPDATE_EVERY steps after the last, from
  # UPDATE_AT on. Reset to an update step before each call, as before, every timed
  # update came one step after the last, with the same random keys.
  pruner = prunax.SET(sparsity=0.5, scheduler=sched.PeriodicSchedule(10, 0, 1000))
  tx = pruner.wrap_optax(optax.sgd(0.1))
  update = jax.jit(tx.update)
  seen = []  # (step counter, whether the masks changed) of every call

  def step(p, s, batch):
    before = prunax.get_sparse_state(s).masks['w']
    u, new = update({'w': batch * p['w']}, s, p)
    changed = bool((before != prunax.get_sparse_state(new).masks['w']).any())
    seen.append((int(s.count), changed))
    return optax.apply_updates(p, u), new

  params = {'w': jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}
  dense = [params, ()]
  dense_step = lambda p, s, b: (jax.tree.map(jnp.negative, p), s)  # noqa: E731
  timings = list(run.alternated(step, tx, params, jnp.ones((64, 64)), dense, dense_step, 2, kind))
  assert len(timings) == 2 and all(d > 0 and t > 0 for d, t in timings)
  counts = [c for c, _ in seen]
  count, every = run.KINDS[kind]
  if count is not None:  # the counter reset before each call: steps without an update
    assert set(counts) == {count} and not any(changed for _, changed in seen)
    return
  assert counts == list(range(len(counts)))  # training's own steps, never reset
  timed = counts[run.UPDATE_AT :: every]
  assert len(timed) == 2 * 3 and timed[0] == run.UPDATE_AT
  if every == run.UPDATE_EVERY:  # each one of SET's mask updates
    assert all(changed for c, changed in seen if c in timed)

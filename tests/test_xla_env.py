"""The suite's XLA settings reach it and the processes it launches (``tests/xla_env.py``)."""

import os

import pytest

from tests import xla_env


def test_the_suite_runs_at_its_backend_level_unless_told_another():
  assert xla_env.suite_flags('') == '--xla_backend_optimization_level=0'
  assert (
    xla_env.suite_flags('--xla_dump_to=d') == '--xla_dump_to=d --xla_backend_optimization_level=0'
  )
  given = '--xla_backend_optimization_level=3 --xla_dump_to=d'
  assert xla_env.suite_flags(given) == given
  assert xla_env.LEVEL_FLAG in os.environ['XLA_FLAGS']  # set by tests/conftest.py


@pytest.mark.parametrize('parent', ['', '--xla_dump_to=d --xla_force_host_platform_device_count=2'])
def test_children_get_their_devices_and_keep_the_other_flags(monkeypatch, parent):
  monkeypatch.setenv('XLA_FLAGS', parent)
  env = xla_env.cpu_env(8)
  flags = env['XLA_FLAGS'].split()
  assert [f for f in flags if 'device_count' in f] == ['--xla_force_host_platform_device_count=8']
  assert '--xla_backend_optimization_level=0' in flags
  assert ('--xla_dump_to=d' in flags) == bool(parent)
  assert env['JAX_PLATFORMS'] == 'cpu'


HLO_SCRIPT = """
import hashlib, json, jax, jax.numpy as jnp, optax, prunax
from prunax import sparsity_schedules as sched

params = {f'w{i}': jax.random.normal(jax.random.PRNGKey(i), (64, 64)) for i in range(3)}
out = {}
for name, updater in [
    ('rigl', prunax.RigL(sparsity=0.8, scheduler=sched.PeriodicSchedule(1, 1),
                         drop_fraction_fn='constant')),
    ('ste', prunax.SteMagnitudePruning(sparsity=0.8)),
]:
  tx = updater.wrap_optax(optax.adam(1e-3))

  def step(p, s):
    g = jax.grad(lambda p: sum(jnp.sum(jnp.tanh(w) ** 2) for w in p.values()))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  c = jax.jit(step).lower(params, tx.init(params)).compile()
  out[name] = [hashlib.sha256(c.as_text().encode()).hexdigest(),
               c.memory_analysis().temp_size_in_bytes]
print('REPORT' + json.dumps(out))
"""


def hlo_report(level: str | None) -> dict:
  env = xla_env.cpu_env(1)
  if level is not None:
    env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
      f'{xla_env.LEVEL_FLAG}=0', f'{xla_env.LEVEL_FLAG}={level}'
    )
  return xla_env.child_report(HLO_SCRIPT, env, timeout=300)


def test_the_level_changes_nothing_the_tests_read():
  # The optimised HLO (fusions, layouts, instructions) and the temporaries of a
  # mask-update step and a straight-through step are the same at the suite's level and
  # at XLA's default (3): only LLVM's work on the generated code differs.
  assert hlo_report(None) == hlo_report('3')

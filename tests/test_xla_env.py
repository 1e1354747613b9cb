"""The suite's XLA settings reach it and the processes it launches (``tests/xla_env.py``)."""

import os

import pytest

from tests import xla_env

LEVEL_0 = '--xla_backend_optimization_level=0'
OLD_EMITTERS = '--xla_cpu_use_fusion_emitters=false'


def test_the_suite_runs_at_its_level_and_emitters_unless_told_others():
  assert xla_env.suite_flags('') == f'{LEVEL_0} {OLD_EMITTERS}'
  assert xla_env.suite_flags('--xla_dump_to=d') == f'--xla_dump_to=d {LEVEL_0} {OLD_EMITTERS}'
  given = '--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true --xla_dump_to=d'
  assert xla_env.suite_flags(given) == given
  assert xla_env.suite_flags('--xla_cpu_use_fusion_emitters=true') == (
    f'--xla_cpu_use_fusion_emitters=true {LEVEL_0}'
  )
  flags = os.environ['XLA_FLAGS']  # set by tests/conftest.py
  assert xla_env.LEVEL_FLAG in flags and xla_env.EMITTERS_FLAG in flags


@pytest.mark.parametrize('parent', ['', '--xla_dump_to=d --xla_force_host_platform_device_count=2'])
def test_children_get_their_devices_and_keep_the_other_flags(monkeypatch, parent):
  monkeypatch.setenv('XLA_FLAGS', parent)
  env = xla_env.cpu_env(8)
  flags = env['XLA_FLAGS'].split()
  assert [f for f in flags if 'device_count' in f] == ['--xla_force_host_platform_device_count=8']
  assert LEVEL_0 in flags and OLD_EMITTERS in flags
  assert ('--xla_dump_to=d' in flags) == bool(parent)
  assert env['JAX_PLATFORMS'] == 'cpu'
  users = xla_env.cpu_env(8, users_emitters=True)['XLA_FLAGS'].split()
  assert users == [f for f in flags if f != OLD_EMITTERS]


HLO_SCRIPT = """
import hashlib, json, jax, jax.numpy as jnp, optax, prunax
from prunax import sparsity_schedules as sched
from tests.xla_env import compile_as_users

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

  lowered = jax.jit(step).lower(params, tx.init(params))
  for how, c in (('plain', lowered.compile()), ('as_users', compile_as_users(lowered))):
    out[f'{name}/{how}'] = [hashlib.sha256(c.as_text().encode()).hexdigest(),
                            c.memory_analysis().temp_size_in_bytes]
print('REPORT' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def hlo_reports():
  """The child's report with the suite's own flags (whatever flags this run was given), at
  XLA's default level (3), and without the suite's fusion emitters."""
  suite = xla_env.suite_flags('--xla_force_host_platform_device_count=1')
  flags = {
    'suite': suite,
    'level_3': suite.replace(LEVEL_0, '--xla_backend_optimization_level=3'),
    'users': xla_env.users_flags(suite),
  }
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports tests
  env = dict(xla_env.cpu_env(1), PYTHONPATH=root)
  return {
    name: xla_env.child_report(HLO_SCRIPT, dict(env, XLA_FLAGS=f), timeout=300)
    for name, f in flags.items()
  }


def test_the_level_changes_nothing_the_tests_read(hlo_reports):
  # The optimised HLO (fusions, layouts, instructions) and the temporaries of a
  # mask-update step and a straight-through step are the same at the suite's level and
  # at XLA's default (3): only LLVM's work on the generated code differs.
  assert hlo_reports['suite'] == hlo_reports['level_3']


def test_compiled_as_users_the_hlo_is_that_of_a_process_without_the_suite_emitters(hlo_reports):
  suite, users = hlo_reports['suite'], hlo_reports['users']
  for name in ('rigl', 'ste'):
    assert suite[f'{name}/as_users'] == users[f'{name}/plain'], name
  # Why tests read HLO compiled as users': the suite's emitters fuse it differently. When
  # this fails, XLA no longer does: compile_as_users can go.
  assert suite['rigl/plain'][0] != users['rigl/plain'][0]

"""How many rounds XLA's simplification pipeline runs over a pruned step.

XLA runs its "simplification" pipeline (algebraic simplifier, DCE, while-loop and
reshape passes, ...) over the whole program until a round changes nothing, so every
round costs a pass over every leaf's instructions, the dense model's included. A view
that a selection loop takes before an elementwise chain (keys viewed as rows of 32 before
they are computed; a gathered sample, see ``_xla_workarounds.gathered_sample``), or a
loop invariant that XLA hoists out of the loop body (``p - 1``, rewritten ``p +
negate(1)``; shifts computed from an iota), takes one more round per operation of the
chain: magnitude, STE and global magnitude steps took 8 rounds and SET 5, where the dense
step takes 2. The rounds are read from XLA's own log (``hlo_pass_fix`` at verbosity 3)
of a child process (with the fusion emitters of a user's process), which compiles each
step between two marker lines.
"""

import re
import subprocess
import sys

import pytest

from tests.xla_env import cpu_env

CHILD = r"""
import sys
import jax, jax.numpy as jnp, optax, prunax
from prunax import sparsity_schedules as sched

params = {f'l{i}': jnp.linspace(-1.0, 1.0, 128 * 128).reshape(128, 128) * (i + 1) for i in range(4)}
x = jnp.ones((8, 128))

def loss(p):
  h = x
  for i in range(4):
    h = jnp.tanh(h @ p[f'l{i}'])
  return jnp.sum(h)

poly = sched.PolynomialSchedule(10, 0, 100)
periodic = sched.PeriodicSchedule(10, 0, 100)
steps = {
  'dense': lambda: optax.adam(1e-3),
  'magnitude': lambda: prunax.MagnitudePruning(sparsity=0.9, scheduler=poly),
  'magnitude_ste': lambda: prunax.SteMagnitudePruning(sparsity=0.9),
  'global_magnitude': lambda: prunax.GlobalMagnitudePruning(sparsity=0.9, scheduler=poly),
  'set': lambda: prunax.SET(sparsity=0.9, scheduler=periodic),
}
for name in sys.argv[1].split(','):
  tx = steps[name]()
  if name != 'dense':
    tx = tx.wrap_optax(optax.adam(1e-3))
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s
  lowered = jax.jit(step).lower(params, tx.init(params))
  print('MARK begin', name, file=sys.stderr, flush=True)
  lowered.compile()
  print('MARK end', name, file=sys.stderr, flush=True)
"""

_ROUND = re.compile(r'\] simplification iteration (\d+) changed_this_iteration')


def parse_rounds(log: str) -> dict[str, int]:
  """``{step: rounds}`` of the "simplification" pipeline in each marked compile of
  ``log`` (the rounds of its one run over the step's program, the last one changing
  nothing)."""
  rounds: dict[str, int] = {}
  name = None
  for line in log.splitlines():
    if line.startswith('MARK begin '):
      name = line.split()[2]
      rounds[name] = 0
    elif line.startswith('MARK end '):
      name = None
    elif name is not None and (m := _ROUND.search(line)):
      rounds[name] = max(rounds[name], int(m[1]) + 1)
  return rounds


def simplification_rounds(steps: list[str], workarounds_off: str = '') -> dict[str, int]:
  """``{step: rounds}`` of the steps of :data:`CHILD` compiled in a child process, with
  ``PRUNAX_XLA_WORKAROUNDS_OFF=workarounds_off``."""
  env = dict(
    cpu_env(1, users_emitters=True),  # the suite's older emitters canonicalise no gather
    TF_CPP_MIN_LOG_LEVEL='0',
    TF_CPP_VMODULE='hlo_pass_fix=3',
    PRUNAX_XLA_WORKAROUNDS_OFF=workarounds_off,
  )
  out = subprocess.run(
    [sys.executable, '-c', CHILD, ','.join(steps)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  rounds = parse_rounds(out.stderr)
  # An XLA that logs its rounds otherwise leaves no round to read: fail, do not pass.
  assert set(rounds) == set(steps) and min(rounds.values()) >= 1, (
    'no "simplification iteration N changed_this_iteration" lines of XLA (hlo_pass_fix.h, '
    f'jaxlib 0.10.2) between the markers; this XLA logs differently: {rounds}'
  )
  return rounds


@pytest.fixture(scope='module')
def rounds() -> dict[str, int]:
  return simplification_rounds(['dense', 'magnitude', 'magnitude_ste', 'global_magnitude', 'set'])


@pytest.mark.parametrize('algorithm', ['magnitude', 'magnitude_ste', 'global_magnitude', 'set'])
def test_a_pruned_step_is_simplified_in_few_rounds(algorithm, rounds):
  # Before the keys were viewed as rows only for their sum, the loop body held no
  # hoistable invariant and the samples were gathered behind a barrier: 8 rounds (SET 5).
  assert rounds['dense'] == 2, rounds
  assert rounds[algorithm] <= 3, rounds

"""`python -m benchmarks.compile_kernels`: XLA's compile timers of a step, per kernel and
per the prunax code that made each kernel."""

import os

import pytest

from benchmarks import compile_kernels
from tests import xla_env


def test_kernels_of_a_pruned_step_are_timed_and_named_by_their_prunax_code(monkeypatch):
  # The suite's older fusion emitters compile a module's kernels as one LLVM module; the
  # children compile with the emitters of a user's process (tests/xla_env.py).
  monkeypatch.setenv('XLA_FLAGS', xla_env.users_flags(os.environ.get('XLA_FLAGS', '')))
  dense = compile_kernels.profile('mlp', 1, 'dense', 2)
  pruned = compile_kernels.profile('mlp', 1, 'magnitude', 2)
  for r in (dense, pruned):
    assert r['kernels'] and all(k[0] > 0 for k in r['kernels'])
    assert 0 < r['passes'] < r['total'] and 0 < r['codegen'] < r['total']
    assert sum(r['origins'].values()) == pytest.approx(sum(k[0] for k in r['kernels']))
    assert r['pass_times'] and max(r['pass_times'].values()) <= r['passes']
  # The selection loop of a 256 x 256 leaf adds kernels (counting passes, brackets).
  assert len(pruned['kernels']) > len(dense['kernels'])
  prunax_code = ('selection.', 'engines.', 'masks.', '_xla_workarounds.')
  assert not [o for o in dense['origins'] if o.startswith(prunax_code)]
  loop = [k for k in pruned['kernels'] if k[4].startswith('selection._search_each')]
  assert loop, pruned['origins']
  # Each kernel of a fusion has its result type and instruction count from the HLO.
  assert all(k[2].startswith(('u32[', 's32[', 'pred[', 'f32[')) and k[3] > 0 for k in loop)
  text = compile_kernels.report({'dense': dense, 'magnitude': pruned}, 5, 'dense')
  row = next(line for line in text.splitlines() if line.startswith('| kernels compiled |'))
  n, m = len(dense['kernels']), len(pruned['kernels'])
  assert row == f'| kernels compiled | {n} | {m} ({m / n:.2f}x) |'


def test_a_log_without_xla_timers_is_an_error_that_says_what_was_looked_for():
  with pytest.raises(RuntimeError, match='Running HLO passes on'):
    compile_kernels.parse('compile 1.0\n', '', 2)

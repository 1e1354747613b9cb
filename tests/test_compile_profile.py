"""The opt-in plugin that shows where the suite's time goes (``tests/compile_profile.py``)."""

import copy
import sys

import jax
import jax.numpy as jnp
from jax import monitoring

from tests import compile_profile


def test_compiles_are_counted_for_the_test_that_ran_them():
  profile = compile_profile.CompileProfile()
  x = jnp.arange(7.0)  # made outside the tests: it compiles too
  monitoring.register_event_duration_secs_listener(profile.on_event)
  try:
    profile.current = 'tests/a.py::test_one'
    line = sys._getframe().f_lineno + 1
    jax.jit(lambda x: jnp.sin(x) * 3.0)(x).block_until_ready()
    profile.tests['tests/a.py::test_one']['wall'] += 10.0
    profile.current = None  # between tests: nothing is counted
    jax.jit(lambda x: x + 1)(x).block_until_ready()
    profile.current = 'tests/a.py::test_two'
    profile.tests['tests/a.py::test_two']['wall'] += 1.0
  finally:
    monitoring.unregister_event_duration_listener(profile.on_event)
  one = profile.tests['tests/a.py::test_one']
  assert one['compiles'] == 1 and one['trace'] > 0 and one['lower'] > 0 and one['compile'] > 0
  assert profile.tests['tests/a.py::test_two']['compiles'] == 0
  rows = dict(profile.rows())
  assert list(rows) == ['tests/a.py::test_one', 'tests/a.py::test_two']  # longest first
  spent = one['trace'] + one['lower'] + one['compile']
  assert abs(rows['tests/a.py::test_one']['other'] - (10.0 - spent)) < 1e-9
  by_file = dict(profile.rows(by_file=True))
  assert list(by_file) == ['tests/a.py'] and by_file['tests/a.py']['wall'] == 11.0
  lines = profile.table(top=1)
  assert lines[1].split()[-1] == '(all)' and lines[2].split()[-1] == 'tests/a.py::test_one'
  assert len(lines) == 3
  # The compile is counted at the line that ran it, past JAX's frames.
  ((site, figures),) = profile.sites.items()
  assert site.endswith(f'test_compile_profile.py:{line}'), site
  assert figures['compiles'] == 1 and figures['seconds'] == one['lower'] + one['compile']
  assert profile.site_table(top=1)[1].split() == [f'{figures["seconds"]:.1f}', '1', site]


class _Probe:
  def __deepcopy__(self, memo):
    return compile_profile.caller_site(sys._getframe(1))  # from copy.py's frame


def test_a_site_is_the_first_frame_outside_the_libraries():
  line = sys._getframe().f_lineno + 1
  site = copy.deepcopy(_Probe())  # the standard library's frames are passed over
  assert site.endswith(f'test_compile_profile.py:{line}'), site

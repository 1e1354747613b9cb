"""Where the suite's time goes: JAX's tracing, lowering and XLA compiles, test by test.

An opt-in pytest plugin (``make test ARGS="-p tests.compile_profile"``): it listens to
JAX's compile-time events (``jax.monitoring``) while each test runs (setup, call and
teardown, so module fixtures count where they run) and prints, at the end, the tests and
files that took longest, with how much of their time JAX spent tracing, lowering to MLIR
and compiling with XLA, and how many XLA compiles they ran. Under ``pytest-xdist`` the
workers send their figures to the main process, which prints one table. Child processes
(the 8-device tests, the hosts' launchers) are not seen: their time shows as "other".

Measured with it on a 2-core Intel Xeon (jax 0.10.2, 956 tests, 539 s): of 1031 s spent
in the tests, 111 s were tracing, 203 s lowering and 376 s XLA compiles (10836 of them:
most are single operations run eagerly, each compiled once per shape, about 15 ms each
at the suite's XLA level); most of the other 342 s ran in child processes.
"""

from __future__ import annotations

import collections
import time

import pytest
from jax import monitoring

# JAX's compile events (jax._src.dispatch) and the names the report gives them.
EVENTS = {
  '/jax/core/compile/jaxpr_trace_duration': 'trace',
  '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
  '/jax/core/compile/backend_compile_duration': 'compile',
}
COLUMNS = ('wall', 'trace', 'lower', 'compile', 'compiles', 'other')


class CompileProfile:
  """Seconds of every test, and of JAX's compile events while it ran."""

  def __init__(self):
    self.current: str | None = None
    self.tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def on_event(self, event: str, duration: float, **_) -> None:
    name = EVENTS.get(event)
    if name is None or self.current is None:
      return
    self.tests[self.current][name] += duration
    if name == 'compile':
      self.tests[self.current]['compiles'] += 1

  def rows(self, by_file: bool = False) -> list[tuple[str, dict[str, float]]]:
    """``(test or file, figures)`` by decreasing wall time; ``other`` is the wall time
    outside JAX's compile events (running, Python, child processes)."""
    return self._grouped(lambda test: test.split('::')[0] if by_file else test)

  def _grouped(self, key) -> list[tuple[str, dict[str, float]]]:
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test, figures in self.tests.items():
      totals[key(test)].update(figures)
    out = []
    for name, figures in totals.items():
      row = {c: float(figures[c]) for c in COLUMNS[:-1]}
      row['other'] = row['wall'] - row['trace'] - row['lower'] - row['compile']
      out.append((name, row))
    return sorted(out, key=lambda r: -r[1]['wall'])

  def table(self, top: int, by_file: bool = False) -> list[str]:
    """Lines of the ``top`` rows, with the totals of every test first."""
    lines = ['  '.join(f'{c:>8}' for c in COLUMNS) + '  ' + ('file' if by_file else 'test')]
    for name, row in self._grouped(lambda _: '(all)') + self.rows(by_file)[:top]:
      cells = [f'{int(row[c]):8d}' if c == 'compiles' else f'{row[c]:8.1f}' for c in COLUMNS]
      lines.append('  '.join(cells) + '  ' + name)
    return lines


_PROFILE = CompileProfile()


def pytest_configure(config):
  monitoring.register_event_duration_secs_listener(_PROFILE.on_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _PROFILE.current = item.nodeid
  start = time.perf_counter()
  yield
  _PROFILE.tests[item.nodeid]['wall'] += time.perf_counter() - start
  _PROFILE.current = None


def pytest_sessionfinish(session):
  workeroutput = getattr(session.config, 'workeroutput', None)
  if workeroutput is not None:  # an xdist worker: the main process prints the table
    workeroutput['compile_profile'] = {t: dict(f) for t, f in _PROFILE.tests.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  del error
  for test, figures in getattr(node, 'workeroutput', {}).get('compile_profile', {}).items():
    _PROFILE.tests[test].update(figures)


def pytest_terminal_summary(terminalreporter):
  if not _PROFILE.tests:
    return
  terminalreporter.section('JAX compile time by file (seconds)')
  for line in _PROFILE.table(top=25, by_file=True):
    terminalreporter.write_line(line)
  terminalreporter.section('JAX compile time by test (seconds)')
  for line in _PROFILE.table(top=40):
    terminalreporter.write_line(line)

"""Where the suite's time goes: JAX's tracing, lowering and XLA compiles, test by test.

An opt-in pytest plugin (``make test ARGS="-p tests.compile_profile"``): it listens to
JAX's compile-time events (``jax.monitoring``) while each test runs (setup, call and
teardown, so module fixtures count where they run) and prints, at the end, the tests and
files that took longest, with how much of their time JAX spent tracing, lowering to MLIR
and compiling with XLA, and how many XLA compiles they ran; then the code lines whose
lowering and compiles took longest (a compile's line is the first frame outside the
installed packages and the standard library: a test's line, or prunax's where it runs
operations eagerly). Under ``pytest-xdist`` the workers send their figures to the main
process, which prints one table. Child processes (the 8-device tests, the hosts'
launchers) are not seen: their time shows as "other".

Measured with it on a 2-core Intel Xeon (jax 0.10.2, 956 tests, 539 s): of 1031 s spent
in the tests, 111 s were tracing, 203 s lowering and 376 s XLA compiles (10836 of them:
most are single operations run eagerly, each compiled once per shape, about 15 ms each
at the suite's XLA level); most of the other 342 s ran in child processes.
"""

from __future__ import annotations

import collections
import os
import sys
import sysconfig
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
# Frames of installed packages and of the standard library: a compile's site is the first
# frame outside them (a test's line, or prunax's where it runs operations eagerly).
_LIBRARY_DIRS = tuple(
  {
    os.path.join(sysconfig.get_paths()[k], '')
    for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')
  }
)


def caller_site(frame=None) -> str:
  """``path:line`` of the innermost frame that is neither in an installed package, the
  standard library nor this module (from ``frame``, by default the caller's); the path is
  relative to the working directory when under it."""
  frame = sys._getframe(1) if frame is None else frame
  while frame is not None:
    path = frame.f_code.co_filename
    if not (path.startswith(_LIBRARY_DIRS) or path.startswith('<') or path == __file__):
      return f'{os.path.relpath(path) if path.startswith(os.getcwd()) else path}:{frame.f_lineno}'
    frame = frame.f_back
  return '(unknown)'


class CompileProfile:
  """Seconds of every test, and of JAX's compile events while it ran."""

  def __init__(self):
    self.current: str | None = None
    self.tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    # Seconds of lowering and XLA compile, and compiles, by the line that ran them.
    self.sites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def on_event(self, event: str, duration: float, **_) -> None:
    name = EVENTS.get(event)
    if name is None or self.current is None:
      return
    self.tests[self.current][name] += duration
    if name != 'trace':  # lowering and compile run in the caller's stack, after tracing
      site = self.sites[caller_site()]
      site['seconds'] += duration
    if name == 'compile':
      self.tests[self.current]['compiles'] += 1
      site['compiles'] += 1

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

  def site_table(self, top: int) -> list[str]:
    """Lines of the ``top`` code lines whose lowering and XLA compiles took longest."""
    rows = sorted(self.sites.items(), key=lambda r: -r[1]['seconds'])[:top]
    lines = [f'{"seconds":>8}  {"compiles":>8}  line that ran them']
    for site, f in rows:
      lines.append(f'{f["seconds"]:8.1f}  {int(f["compiles"]):8d}  {site}')
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
    workeroutput['compile_sites'] = {s: dict(f) for s, f in _PROFILE.sites.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  del error
  output = getattr(node, 'workeroutput', {})
  for test, figures in output.get('compile_profile', {}).items():
    _PROFILE.tests[test].update(figures)
  for site, figures in output.get('compile_sites', {}).items():
    _PROFILE.sites[site].update(figures)


def pytest_terminal_summary(terminalreporter):
  if not _PROFILE.tests:
    return
  terminalreporter.section('JAX compile time by file (seconds)')
  for line in _PROFILE.table(top=25, by_file=True):
    terminalreporter.write_line(line)
  terminalreporter.section('JAX compile time by test (seconds)')
  for line in _PROFILE.table(top=40):
    terminalreporter.write_line(line)
  terminalreporter.section('JAX lowering and XLA compiles by the line that ran them')
  for line in _PROFILE.site_table(top=30):
    terminalreporter.write_line(line)

"""The examples (``>>>``) of the docstrings run as doctests, so they cannot drift.

Every module of the core and of the adapters whose source holds an example is imported and
its doctests run; an adapter module is skipped when its host is not installed. The key
public entry points must keep an example.
"""

import doctest
import importlib
import importlib.util
import pathlib

import pytest

import prunax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = [ROOT / 'core'] + sorted((ROOT / 'integrations').glob('*'))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
  """Dotted names of the package modules whose source has a ``>>>`` example."""
  names = []
  for root in PACKAGE_ROOTS:
    for path in sorted(root.glob('prunax*/**/*.py')):
      if '>>> ' not in path.read_text():
        continue
      parts = path.relative_to(root).with_suffix('').parts
      names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


MODULES = _modules_with_examples()


def _import(name: str):
  top = name.split('.')[0]
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    # An adapter module needs its host; the core needs only its own dependencies.
    if top != 'prunax' and e.name is not None and not e.name.startswith(top):
      pytest.skip(f'{name} needs {e.name}, which is not installed')
    raise


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = _import(name)
  tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
  assert tests, f'{name} has ">>> " in its source but no doctest was collected'
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  for test in tests:
    runner.run(test)
  failed, attempted = runner.summarize(verbose=False)
  assert attempted and not failed, f'{failed} of {attempted} examples of {name} failed (above)'


@pytest.mark.parametrize(
  'obj',
  [
    prunax.MagnitudePruning,
    prunax.BaseUpdater.wrap_optax,
    prunax.RigL,
    prunax.oneshot.prune,
    prunax.shrink,
    prunax.summarize_sparsity,
    prunax.flops.FlopsCounter,
  ],
  ids=lambda obj: obj.__qualname__,
)
def test_key_entry_points_have_examples(obj):
  # The examples run through test_docstring_examples, collected from their modules.
  assert obj.__module__ in MODULES
  assert '\n  Examples:\n' in obj.__doc__ or '\n    Examples:\n' in obj.__doc__
  assert doctest.DocTestParser().get_examples(obj.__doc__), obj.__qualname__

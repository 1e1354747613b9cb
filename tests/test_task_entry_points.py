"""Tasks of ``prunax compare`` come from the entry point group ``prunax.compare_tasks``; the
core imports no adapter."""

import ast
import importlib.metadata
import importlib.util
import pathlib

import pytest

from prunax.compare import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAPTERS = ('prunax_fedjax', 'prunax_dopamine', 'prunax_t5x', 'prunax_scenic')
# (adapter directory, task name, factory) declared by the adapters' pyproject.toml.
DECLARED = (
  ('fedjax', 'federated_digits', 'prunax_fedjax.compare_task:federated_digits_task'),
  ('dopamine', 'cartpole', 'prunax_dopamine.compare_task:cartpole_task'),
)


def _core_modules():
  return sorted((ROOT / 'core' / 'prunax').rglob('*.py'))


def test_core_imports_no_adapter():
  offenders = []
  for path in _core_modules():
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
      id(node.body[0].value)
      for node in ast.walk(tree)
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      and node.body
      and isinstance(node.body[0], ast.Expr)
      and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or '']
      elif (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
      ):
        names = [node.value]  # importlib.import_module('prunax_...') and the like
      else:
        continue
      for name in names:
        if name.split('.')[0] in ADAPTERS:
          offenders.append(f'{path.relative_to(ROOT)}:{node.lineno}: {name}')
  assert not offenders, offenders


def test_core_knows_no_host_tool():
  # Gin bindings and Dopamine's console log belong to the Dopamine adapter.
  for path in _core_modules():
    text = path.read_text()
    for marker in ('JaxDQNAgent', 'Train/AverageReturns', 'Runner.num_iterations'):
      assert marker not in text, (path, marker)


@pytest.mark.parametrize('host, name, value', DECLARED)
def test_adapters_declare_their_tasks(host, name, value):
  tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from 3.11')
  pyproject = tomllib.loads((ROOT / 'integrations' / host / 'pyproject.toml').read_text())
  assert pyproject['project']['entry-points']['prunax.compare_tasks'] == {name: value}


@pytest.mark.parametrize('host, name, value', DECLARED)
def test_installed_task_entry_points_resolve(host, name, value):
  module = value.split('.')[0]
  if importlib.util.find_spec(module) is None:
    pytest.skip(f'{module} is not installed')
  installed = {
    ep.name: ep.value for ep in importlib.metadata.entry_points(group=tasks.ENTRY_POINT_GROUP)
  }
  assert installed.get(name) == value, (
    f'{name!r} is not declared by the installed {module}: reinstall it (make .venv/.installed)'
  )
  assert name in tasks.available_tasks()
  factory = tasks.resolve_task_factory(name)
  assert f'{factory.__module__}:{factory.__name__}' == value
  task = tasks.make_task(name)
  assert task.name == name
  assert callable(task.run) and callable(task.example_params)


def _fake_entry_points(*entries):
  eps = importlib.metadata.EntryPoints(
    importlib.metadata.EntryPoint(name, value, tasks.ENTRY_POINT_GROUP) for name, value in entries
  )

  def entry_points(*, group):
    return eps.select(group=group)

  return entry_points


def test_a_declared_task_is_found_and_an_unknown_one_lists_them(monkeypatch):
  monkeypatch.setattr(
    importlib.metadata,
    'entry_points',
    _fake_entry_points(
      ('toy', 'prunax.compare.tasks:digits_task'),
      ('broken', 'no_such_mod:f'),
      ('missing', 'prunax.compare.tasks:no_such_factory'),
      ('not_callable', 'prunax.compare.tasks:ENTRY_POINT_GROUP'),
    ),
  )
  assert tasks.available_tasks() == [
    'digits',
    'noisy_digits',
    'lm',
    'broken',
    'missing',
    'not_callable',
    'toy',
  ]
  assert tasks.resolve_task_factory('toy') is tasks.digits_task
  # A missing module or attribute names the task, its entry point and the group.
  with pytest.raises(
    ValueError,
    match=r"Task 'broken' \(no_such_mod:f, .*'prunax.compare_tasks'\) cannot be loaded: "
    r'ModuleNotFoundError',
  ):
    tasks.resolve_task_factory('broken')
  with pytest.raises(
    ValueError,
    match=r"Task 'missing' \(prunax.compare.tasks:no_such_factory, .*cannot be loaded: "
    r'AttributeError',
  ):
    tasks.resolve_task_factory('missing')
  with pytest.raises(ValueError, match=r"Task 'not_callable' .* is not callable"):
    tasks.resolve_task_factory('not_callable')
  with pytest.raises(
    ValueError,
    match=r"Unknown task 'nope'; valid tasks are \['digits', 'noisy_digits', 'lm', 'broken',",
  ):
    tasks.resolve_task_factory('nope')
  # A plug-in named module:function needs no entry point.
  assert tasks.resolve_task_factory('prunax.compare.tasks:noisy_digits_task') is (
    tasks.noisy_digits_task
  )


def test_an_entry_point_cannot_shadow_a_builtin_task(monkeypatch):
  monkeypatch.setattr(
    importlib.metadata, 'entry_points', _fake_entry_points(('digits', 'no_such_mod:f'))
  )
  assert tasks.available_tasks() == ['digits', 'noisy_digits', 'lm']
  assert tasks.resolve_task_factory('digits') is tasks.digits_task

"""End-to-end tests of ``prunax compare`` on the embedded digits task (tiny runs)."""

import csv
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import cli
from prunax import compare
from prunax import registry
from prunax import sparsity_types
from prunax.compare import config as config_lib
from prunax.compare import report
from prunax.compare import tasks
from tests.core.helpers import packed_mask_nbytes

PNG_HEADER = b'\x89PNG\r\n\x1a\n'
ALGORITHMS = ['no_prune', 'magnitude', 'random']


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _nested(flat):
  """{'params/Conv_0/kernel': x} -> {'params': {'Conv_0': {'kernel': x}}}."""
  out = {}
  for name, x in flat.items():
    node = out
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(x)
  return out


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp('compare') / 'run')
  rc = cli.main(
    [
      'compare',
      '--quick',
      '--run-dir',
      run_dir,
      '--no-progress',
      '--no-compile-cache',
      '--algorithms',
      ','.join(ALGORITHMS),
      '--seeds',
      '2',
      '--steps',
      '20',
      '--set',
      'optional_algorithms=[]',
    ]
  )
  assert rc == 0
  return run_dir


def test_reports_and_plots_are_written(quick_run):
  for name in (
    'accuracy_vs_sparsity.png',
    'accuracy_vs_flops.png',
    'layer_sparsity.png',
    'sparsity_over_steps.png',
  ):
    path = os.path.join(quick_run, name)
    with open(path, 'rb') as f:
      data = f.read()
    assert data[:8] == PNG_HEADER and len(data) > 1000, name
  rows = _rows(os.path.join(quick_run, 'results.csv'))
  assert [r['algorithm'] for r in rows] == ALGORITHMS  # one row per algorithm
  assert all(r['seeds'] == '2' for r in rows)
  assert len(_rows(os.path.join(quick_run, 'cells.csv'))) == len(ALGORITHMS) * 2
  with open(os.path.join(quick_run, 'results.md')) as f:
    md = f.read()
  assert md.count('\n| ') == len(ALGORITHMS) + 1  # header + one line per algorithm
  assert '| magnitude | dense-to-sparse, dynamic, unstructured |' in md
  with open(os.path.join(quick_run, 'report.html')) as f:
    page = f.read()
  assert page.count('src="data:image/png;base64,') == 4
  assert page.count('<tr>') == len(ALGORITHMS) + 1


def test_reported_sparsity_is_measured_on_final_params(quick_run):
  rows = {r['algorithm']: r for r in _rows(os.path.join(quick_run, 'results.csv'))}
  for algorithm in ALGORITHMS:
    measured = []
    for seed in (0, 1):
      params = compare.load_params(quick_run, algorithm, seed)
      kernels = [x for x in params.values() if x.ndim >= 2]
      zeros = sum(int(np.sum(x == 0)) for x in kernels)
      sparsity = zeros / sum(x.size for x in kernels)
      assert sparsity == prunax.summarize_sparsity(params)['total_sparsity']
      with open(os.path.join(quick_run, 'cells', f'{algorithm}__seed{seed}.json')) as f:
        assert json.load(f)['sparsity'] == sparsity
      measured.append(sparsity)
    assert float(rows[algorithm]['sparsity_mean']) == pytest.approx(np.mean(measured), abs=1e-15)
  assert float(rows['no_prune']['sparsity_mean']) == 0.0
  # 20 steps with the gradual schedule end pruning at step 15: the target is reached.
  assert abs(float(rows['magnitude']['sparsity_mean']) - 0.8) < 1e-4


def test_std_over_seeds(quick_run):
  rows = {r['algorithm']: r for r in _rows(os.path.join(quick_run, 'results.csv'))}
  cells = {(r['algorithm'], r['seed']): r for r in _rows(os.path.join(quick_run, 'cells.csv'))}
  accs = [float(cells[('random', s)]['accuracy']) for s in ('0', '1')]
  assert accs[0] != accs[1]
  assert float(rows['random']['accuracy_std']) == pytest.approx(np.std(accs, ddof=1))
  assert float(rows['random']['accuracy_std']) > 0
  assert report.mean_std([0.5]) == (0.5, 0.0)
  assert report.mean_std([1.0, None]) == (None, None)


def test_mask_memory_and_flops(quick_run):
  cells = {(r['algorithm'], r['seed']): r for r in _rows(os.path.join(quick_run, 'cells.csv'))}
  params = compare.load_params(quick_run, 'magnitude', 0)
  # 1-bit masks of the pruned (ndim >= 2) leaves, packed along the last axis (byte
  # blocks), over float32 params.
  mask_bytes = sum(packed_mask_nbytes(x.shape) for x in params.values() if x.ndim >= 2)
  param_bytes = sum(x.nbytes for x in params.values())
  assert float(cells[('magnitude', '0')]['mask_memory']) == mask_bytes / param_bytes
  assert float(cells[('no_prune', '0')]['mask_memory']) == 0.0
  if importlib.util.find_spec('prunax.flops') is None:
    assert cells[('magnitude', '0')]['inference_flops'] == ''  # reported as n/a
    return
  from prunax import flops

  task = compare.digits_task()
  counter = flops.FlopsCounter(task.apply_fn, task.example_params(), *task.example_inputs())
  for algorithm in ALGORITHMS:
    tree = _nested(compare.load_params(quick_run, algorithm, 0))
    reported = float(cells[(algorithm, '0')]['inference_flops'])
    assert reported == pytest.approx(counter.inference_fraction(tree), rel=1e-12)
  assert float(cells[('no_prune', '0')]['inference_flops']) == 1.0
  assert float(cells[('no_prune', '0')]['training_flops']) == 1.0
  assert float(cells[('magnitude', '0')]['inference_flops']) < 0.5
  # Gradual pruning is dense for part of training: its average training FLOPs exceed those
  # of the final sparse model.
  assert 0.3 < float(cells[('magnitude', '0')]['training_flops']) < 1.0


def test_resume_skips_finished_cells(quick_run):
  cfg = config_lib.load_config(
    None,
    {
      'run_dir': quick_run,
      'algorithms': ALGORITHMS,
      'seeds': 2,
      'steps': 20,
      'optional_algorithms': [],
    },
    quick=True,
  )
  with open(os.path.join(quick_run, 'cells', 'magnitude__seed1.json')) as f:
    before = json.load(f)
  os.remove(os.path.join(quick_run, 'cells', 'magnitude__seed1.json'))
  task = compare.digits_task()
  calls = []
  original = task.run
  task.run = lambda updater, seed, *a, **k: (
    calls.append((type(updater).__name__, seed)) or original(updater, seed, *a, **k)
  )
  result = compare.run_comparison(cfg, task=task)
  assert calls == [('MagnitudePruning', 1)]  # only the missing cell is trained
  after = result.cells[('magnitude', 1)]
  assert after['metric'] == before['metric']  # same recipe, same seed: same result
  assert after['sparsity'] == before['sparsity']
  # One seed of a finished run: nothing trained, std exactly zero.
  one = compare.run_comparison(dict(cfg, seeds=[0]), task=task)
  assert len(calls) == 1
  assert all(row[k] == 0.0 for row in report.rows(one) for k in row if k.endswith('_std'))


def test_resume_refuses_a_different_recipe(quick_run, capsys):
  rc = cli.main(
    [
      'compare',
      '--quick',
      '--run-dir',
      quick_run,
      '--algorithms',
      'magnitude',
      '--steps',
      '21',
      '--no-compile-cache',
    ]
  )
  assert rc == 2
  err = capsys.readouterr().err
  assert 'different config' in err and "'steps'" in err and '--fresh' in err


def test_categories():
  cfg = config_lib.load_config(None)
  expected = {
    'no_prune': ('dense', 'static', 'unstructured'),
    'magnitude': ('dense-to-sparse', 'dynamic', 'unstructured'),
    'magnitude_ste': ('dense-to-sparse', 'dynamic', 'unstructured'),
    'static_sparse': ('sparse-to-sparse', 'static', 'unstructured'),
    'set': ('sparse-to-sparse', 'dynamic', 'unstructured'),
    'rigl': ('sparse-to-sparse', 'dynamic', 'unstructured'),
    # The seven the class attributes got wrong (issue 20).
    'topkast': ('sparse-to-sparse', 'dynamic', 'unstructured'),
    'topkast_ga': ('sparse-to-sparse', 'dynamic', 'unstructured'),
    'snip': ('sparse-to-sparse', 'static', 'unstructured'),
    'grasp': ('sparse-to-sparse', 'static', 'unstructured'),
    'synflow': ('sparse-to-sparse', 'static', 'unstructured'),
    'fixed_masks': ('sparse-to-sparse', 'static', 'unstructured'),
    'str': ('dense-to-sparse', 'dynamic', 'unstructured'),
  }
  unstructured = prunax.algorithms.MagnitudePruning(sparsity=0.5)  # gives only the structure
  for name, want in expected.items():
    cat = compare.category(name, unstructured)
    assert (cat['origin'], cat['dynamics'], cat['structure']) == want, name
  nm = config_lib.make_updater(dict(cfg, sparsity=0.5, sparsity_type='nm_1,2'), 'magnitude', 0)
  assert compare.category('magnitude', nm)['structure'] == 'structured'
  assert compare.category('magnitude', nm, {'magnitude': {'origin': 'x'}})['origin'] == 'x'


def _readme_algorithm_table():
  """{algorithm: (class cell, origin, dynamics)} from the README's algorithm table, and
  the class cells of its rows without a registered name ('-')."""
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'README.md')
  with open(path) as f:
    text = f.read()
  table = text[text.index('## Algorithms') :]
  out, unnamed = {}, []
  for line in table.splitlines()[2:]:
    if not line.startswith('|'):
      if out:
        break
      continue
    cells = [c.strip() for c in line.strip('|').split('|')]
    if cells[0] == '-':
      unnamed.append(cells[1])
      continue
    match = re.fullmatch(r'`(\w+)`', cells[0])
    if match is None:
      continue
    taxonomy = re.fullmatch(
      r'(dense|dense-to-sparse|sparse-to-sparse)(?: \([^)]*\))?, '
      r'(static|dynamic)',
      cells[-1],
    )
    assert taxonomy, f'README taxonomy of {match.group(1)!r} is malformed: {cells[-1]!r}'
    out[match.group(1)] = (cells[1], *taxonomy.groups())
  return out, unnamed


def _prunax_attr(dotted: str):
  """``prunax.<dotted>`` (e.g. ``RigL``, ``pruning_at_init.SNIP``), else None."""
  obj = prunax
  for part in dotted.split('.'):
    obj = getattr(obj, part, None)
  return obj


def test_readme_table_agrees_with_the_registry_metadata():
  readme, unnamed = _readme_algorithm_table()
  assert sorted(readme) == sorted(registry.ALGORITHM_INFO) == registry.all_algorithm_names()
  for name, (class_cell, origin, dynamics) in readme.items():
    info = registry.algorithm_info(name)
    assert (info['origin'], info['dynamics']) == (origin, dynamics), name
    # The class column names the registered class, as reachable from ``prunax``.
    named = re.findall(r'`([\w.]+)`', class_cell)
    assert named, f'README class of {name!r} is malformed: {class_cell!r}'
    assert _prunax_attr(named[0]) is registry.get_algorithm(name), (name, class_cell)
    for other in named[1:]:  # e.g. AutoSparse + `GradientAnnealing`
      assert _prunax_attr(other) is not None, (name, other)
  for class_cell in unnamed:  # rows without a config name: a prunax function
    (dotted,) = re.findall(r'`([\w.]+)`', class_cell)
    assert callable(_prunax_attr(dotted)), class_cell


def test_register_algorithm_info(monkeypatch):
  monkeypatch.setattr(registry, '_ALGORITHMS', dict(registry._ALGORITHMS))
  monkeypatch.setattr(registry, 'ALGORITHM_INFO', dict(registry.ALGORITHM_INFO))

  class Mine(prunax.algorithms.SET):
    pass

  registry.register_algorithm('mine', Mine)  # no info: that of its registered base, SET
  assert registry.algorithm_info('mine') == {
    'origin': 'sparse-to-sparse',
    'dynamics': 'dynamic',
    'schedule': 'periodic',
  }
  # The schedule a config of the name builds is that metadata: periodic, as SET's.
  updater = registry.create_updater_from_config(
    {'algorithm': 'mine', 'sparsity': 0.5, 'update_freq': 5, 'update_end_step': 50}
  )
  assert isinstance(updater.scheduler, prunax.sparsity_schedules.PeriodicSchedule)
  with pytest.raises(ValueError, match="origin in .* got {'origin': 'sideways'"):
    registry.register_algorithm('mine2', Mine, {'origin': 'sideways', 'dynamics': 'static'})
  with pytest.raises(ValueError, match=r"schedule in \['pruning', 'periodic', 'alternating'"):
    registry.register_algorithm('mine4', Mine, {'schedule': 'weekly'})
  with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
    registry.register_algorithm('mine5', Mine, {'colour': 'red'})
  # A pruner registered with only its schedule keeps the rest of its base's metadata.
  registry.register_algorithm('mine6', Mine, {'schedule': 'none'})
  assert registry.algorithm_info('mine6')['origin'] == 'sparse-to-sparse'
  assert isinstance(
    registry.create_updater_from_config({'algorithm': 'mine6', 'sparsity': 0.5}).scheduler,
    prunax.sparsity_schedules.NoUpdateSchedule,
  )
  registry.register_algorithm('mine3', Mine, {'origin': 'dense-to-sparse', 'dynamics': 'static'})
  assert compare.category('mine3', Mine(sparsity=0.5))['origin'] == 'dense-to-sparse'


def test_schedule_follows_steps():
  cfg = config_lib.load_config(None, {'steps': 600})
  assert config_lib.updater_config(cfg, 'magnitude', 3) == {
    'algorithm': 'magnitude',
    'seed': 3,
    'sparsity': 0.8,
    'dist_type': 'erk',
    'sparsity_type': 'unstructured',
    'update_freq': 20,
    'update_start_step': 120,
    'update_end_step': 450,
  }
  rigl = config_lib.updater_config(cfg, 'rigl', 0)
  assert (rigl['update_start_step'], rigl['drop_fraction']) == (0, 0.3)
  assert config_lib.updater_config(cfg, 'no_prune', 0)['sparsity'] == 0.0
  # AutoSparse's default alpha anneals over the cell's training steps (times its budget).
  assert config_lib.updater_config(cfg, 'autosparse', 0)['training_steps'] == 600
  assert config_lib.make_updater(cfg, 'autosparse', 0).training_steps == 600
  longer = dict(cfg, step_multipliers={'autosparse': 2})
  assert config_lib.updater_config(longer, 'autosparse', 0)['training_steps'] == 1200
  assert 'training_steps' not in config_lib.updater_config(cfg, 'rigl', 0)
  scaled = tasks.scale_schedule(config_lib.make_updater(cfg, 'autosparse', 0), 10)
  assert scaled.training_steps == 6000
  one = config_lib.load_config(None, {'schedule': '10:50:5', 'update_freq': 7})
  assert [
    config_lib.updater_config(one, 'magnitude', 0)[k]
    for k in ('update_start_step', 'update_end_step', 'update_freq')
  ] == [10, 50, 7]


def test_yaml_and_ml_collections_configs(tmp_path):
  yaml_file = tmp_path / 'c.yaml'
  yaml_file.write_text('algorithms: [magnitude, rigl]\nsparsity: 0.9\nseeds: [4, 5]\n')
  cfg = compare.load_config(str(yaml_file), {'sparsity': 0.7})
  assert (cfg['algorithms'], cfg['sparsity'], cfg['seeds']) == (['magnitude', 'rigl'], 0.7, [4, 5])
  py_file = tmp_path / 'c.py'
  py_file.write_text(
    'import ml_collections\n\ndef get_config():\n'
    '  c = ml_collections.ConfigDict()\n  c.algorithms = ["set"]\n'
    '  c.dist_type = "uniform"\n  return c\n'
  )
  # --quick keeps a config's own algorithm list; without one it runs one per category.
  assert compare.load_config(None, quick=True)['algorithms'] == [
    'no_prune',
    'magnitude',
    'static_sparse',
    'rigl',
  ]
  cfg = compare.load_config(str(py_file), quick=True)
  assert (cfg['algorithms'], cfg['dist_type'], cfg['steps'], cfg['seeds']) == (
    ['set'],
    'uniform',
    40,
    [0],
  )


def _fails(tmp_path, capsys, *args):
  run_dir = tmp_path / 'run'
  rc = cli.main(
    ['compare', '--run-dir', str(run_dir), '--no-progress', '--no-compile-cache', *args]
  )
  assert rc == 2
  assert not (run_dir / 'cells').exists() or not os.listdir(run_dir / 'cells')
  return capsys.readouterr().err


def test_bad_inputs_fail_before_training(tmp_path, capsys):
  err = _fails(tmp_path, capsys, '--algorithms', 'magnitude,magnitud')
  assert "Unknown algorithm 'magnitud'" in err and 'rigl' in err
  err = _fails(tmp_path, capsys, '--task', 'imagenet')
  assert "Unknown task 'imagenet'" in err and 'digits' in err
  err = _fails(tmp_path, capsys, '--task', 'no_such_module:get_task')
  assert "Cannot import the task module 'no_such_module'" in err
  err = _fails(tmp_path, capsys, '--sparsity', '1.5')
  assert 'sparsity must be a number in [0, 1), got 1.5' in err
  err = _fails(tmp_path, capsys, '--sparsity', '-0.1')
  assert 'got -0.1' in err
  err = _fails(tmp_path, capsys, '--sparsity-type', 'diagonal')
  assert "Unknown sparsity type 'diagonal'" in err
  err = _fails(tmp_path, capsys, '--schedule', 'often')
  assert 'schedule must be one of' in err and "'often'" in err
  err = _fails(tmp_path, capsys, '--seeds', '0')
  assert 'seeds' in err
  err = _fails(tmp_path, capsys, '--set', 'stepz=3')
  assert "Unknown config keys ['stepz']" in err
  # A structure the model's shapes cannot take is caught on the model, before training.
  err = _fails(
    tmp_path,
    capsys,
    '--sparsity-type',
    'nm_2,3',
    '--sparsity',
    str(1 - 2 / 3),
    '--algorithms',
    'magnitude',
  )
  assert "Algorithm 'magnitude' cannot prune task 'digits'" in err


def test_unwritable_run_dir(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  rc = cli.main(['compare', '--run-dir', str(blocker / 'run'), '--no-progress'])
  assert rc == 2
  err = capsys.readouterr().err
  assert 'is not writable' in err and str(blocker / 'run') in err


def test_malformed_configs(tmp_path, capsys):
  bad = tmp_path / 'bad.yaml'
  bad.write_text('algorithms: [magnitude,\nsteps: 3\n')
  assert cli.main(['compare', '--config', str(bad)]) == 2
  assert 'Malformed YAML in config file' in capsys.readouterr().err
  bad.write_text('- 1\n- 2\n')
  assert cli.main(['compare', '--config', str(bad)]) == 2
  assert 'must hold a mapping' in capsys.readouterr().err
  bad.write_text('steps: -3\n')
  assert cli.main(['compare', '--config', str(bad)]) == 2
  assert 'steps must be an integer >= 1, got -3' in capsys.readouterr().err
  bad.write_text('learning_rate: 0.1\n')
  assert cli.main(['compare', '--config', str(bad)]) == 2
  assert "Unknown config keys ['learning_rate']" in capsys.readouterr().err
  assert cli.main(['compare', '--config', str(tmp_path / 'missing.yaml')]) == 2
  assert 'does not exist' in capsys.readouterr().err
  py = tmp_path / 'bad.py'
  py.write_text('x = 1\n')
  assert cli.main(['compare', '--config', str(py)]) == 2
  assert 'must define get_config()' in capsys.readouterr().err


PLUGIN = """
import jax, jax.numpy as jnp, numpy as np, optax
from prunax.compare import SupervisedTask

def get_task(hidden=16):
  rng = np.random.RandomState(0)
  x = rng.randn(256, 8).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  def init(key):
    k1, k2 = jax.random.split(key)
    return {'w1': jax.random.normal(k1, (8, hidden)) / 3, 'w2': jax.random.normal(k2, (hidden, 2))}
  def apply(p, x):
    return jnp.tanh(x @ p['w1']) @ p['w2']
  return SupervisedTask(name='toy', init_fn=init, apply_fn=apply, train_data=(x, y),
                        eval_data=(x, y), optimizer=optax.adam(1e-2), batch_size=32)
"""


def test_plugin_task_from_file(tmp_path):
  plugin = tmp_path / 'toy_task.py'
  plugin.write_text(PLUGIN)
  cfg = compare.load_config(
    None,
    {
      'task': f'{plugin}:get_task',
      'task_args': {'hidden': 8},
      'algorithms': ['magnitude'],
      'seeds': 1,
      'steps': 12,
      'sparsity': 0.5,
      'dist_type': 'uniform',
      'optional_algorithms': [],
      'run_dir': str(tmp_path / 'run'),
    },
  )
  result = compare.run_comparison(cfg)
  assert result.task_name == 'toy'
  params = compare.load_params(str(tmp_path / 'run'), 'magnitude', 0)
  assert params['w1'].shape == (8, 8)
  assert result.cells[('magnitude', 0)]['sparsity'] == 0.5
  assert 0.0 <= result.cells[('magnitude', 0)]['metric'] <= 1.0
  with pytest.raises(compare.ConfigError, match='does not accept task_args'):
    compare.run_comparison(dict(cfg, task_args={'depth': 2}))


def test_module_entry_point(tmp_path):
  out = subprocess.run(
    [sys.executable, '-m', 'prunax', 'compare', '--algorithms', 'nope', '--run-dir', str(tmp_path)],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2
  assert "prunax compare: error: Unknown algorithm 'nope'" in out.stderr


def test_optional_tasks_need_their_adapters():
  tasks = compare.available_tasks()
  assert 'digits' in tasks
  for name, module in (('federated_digits', 'prunax_fedjax'), ('cartpole', 'prunax_dopamine')):
    if importlib.util.find_spec(module) is None:
      assert name not in tasks
      with pytest.raises(compare.ConfigError, match=f"Unknown task '{name}'; valid tasks are"):
        compare.run_comparison({'task': name})


def _builtin_task_args():
  out = {'digits': {}}
  if importlib.util.find_spec('prunax_fedjax') is not None:
    out['federated_digits'] = {'clients_per_round': 2}
  if importlib.util.find_spec('prunax_dopamine') is not None:
    out['cartpole'] = {'training_steps': 40}  # before min_replay_history: no updates
  return out


@pytest.mark.parametrize('task', ['digits', 'federated_digits', 'cartpole'])
def test_every_task_trains_with_the_whole_updater_config(task, tmp_path, monkeypatch):
  # Every key of the updater config differs from the defaults a task could fall back on.
  args = _builtin_task_args()
  if task not in args:
    pytest.skip(f'the adapter of task {task!r} is not installed')
  cfg = compare.load_config(
    None,
    {
      'task': task,
      'task_args': args[task],
      'algorithms': ['magnitude'],
      'seeds': [3],
      'steps': 3,
      'sparsity': 0.5,
      'dist_type': 'uniform',
      'sparsity_type': 'channel_-1',
      'schedule': '0:1:1',
      'optional_algorithms': [],
      'run_dir': str(tmp_path),
      'algorithm_overrides': {'magnitude': {'power': 2.0}},
    },
  )
  wrapped = []
  original = prunax.algorithms.MagnitudePruning.wrap_optax

  def capture(self, *a, **k):
    wrapped.append(self)
    return original(self, *a, **k)

  monkeypatch.setattr(prunax.algorithms.MagnitudePruning, 'wrap_optax', capture)
  cell = compare.run_comparison(cfg).cells[('magnitude', 3)]
  if task != 'cartpole':  # (cartpole: 40 agent steps make no optimizer update)
    assert 0.0 <= cell['metric'] <= 1.0
    # Half the output channels from step 1 on, measured on the final params (biases stay
    # dense). (N:M runs along a kernel's input axis, which the first conv's 1 channel lacks.)
    assert 0.3 < cell['sparsity'] <= 0.5
  expected = config_lib.make_updater(cfg, 'magnitude', 3)
  assert (expected.sparsity, expected.sparsity_type, expected.scheduler.power) == (
    0.5,
    sparsity_types.from_string('channel_-1'),
    2.0,
  )
  if task == 'cartpole':  # one iteration = training_steps / update_period optimizer updates
    expected = tasks.scale_schedule(expected, 10)
    assert expected.scheduler.update_end_step == 10
  # The digits task compiles one step for every seed (seed 0; the seed is traced state).
  wrapped = [u for u in wrapped if isinstance(u.seed, int)]
  assert wrapped
  for updater in wrapped:
    assert dataclasses.replace(updater, seed=3) == expected
  assert any(u.seed == 3 for u in wrapped) or task == 'digits'


@pytest.mark.skipif(
  importlib.util.find_spec('prunax_dopamine') is None,
  reason='prunax_dopamine (the Dopamine adapter) is not installed',
)
def test_cartpole_task(tmp_path):
  cfg = compare.load_config(
    None,
    {
      'task': 'cartpole',
      'algorithms': ['magnitude'],
      'seeds': 1,
      'steps': 1,
      'optional_algorithms': [],
      'run_dir': str(tmp_path),
    },
  )
  cell = compare.run_comparison(cfg).cells[('magnitude', 0)]
  assert np.isfinite(cell['metric'])


# ------------------------------------------------------------------ sweeps and statistics


def test_sweep_with_a_step_multiplier(tmp_path):
  run_dir = tmp_path / 'sweep'
  rc = cli.main(
    [
      'compare',
      '--run-dir',
      str(run_dir),
      '--no-progress',
      '--no-compile-cache',
      '--algorithms',
      'no_prune,static_sparse',
      '--seeds',
      '2',
      '--steps',
      '10',
      '--sparsity',
      '0.8,0.5',
      '--training-budget',
      '2',
      '--set',
      'optional_algorithms=[]',
    ]
  )
  assert rc == 0
  for point in ('unstructured_s0.5', 'unstructured_s0.8'):
    assert sorted(os.listdir(run_dir / point / 'cells')) == sorted(
      f'{a}__seed{s}.{ext}'
      for a in ('no_prune', 'static_sparse')
      for s in (0, 1)
      for ext in ('json', 'npz')
    )
  rows = _rows(run_dir / 'results.csv')
  assert [(r['point_sparsity'], r['algorithm']) for r in rows] == [
    ('0.5', 'no_prune'),
    ('0.5', 'static_sparse'),
    ('0.8', 'no_prune'),
    ('0.8', 'static_sparse'),
  ]
  by = {(r['point_sparsity'], r['algorithm']): r for r in rows}
  assert abs(float(by[('0.8', 'static_sparse')]['sparsity_mean']) - 0.8) < 1e-3
  # The dense baseline is trained once and shared by both points.
  dense = [
    json.loads((run_dir / p / 'cells' / 'no_prune__seed1.json').read_text())
    for p in ('unstructured_s0.5', 'unstructured_s0.8')
  ]
  assert dense[0] == dense[1]
  # Sparse-to-sparse algorithms train twice as long (the RigL paper's 2x), the rest not.
  cells = _rows(run_dir / 'cells.csv')
  assert {(c['algorithm'], c['steps']) for c in cells} == {
    ('no_prune', '10'),
    ('static_sparse', '20'),
  }
  trace = json.loads(
    (run_dir / 'unstructured_s0.8' / 'cells' / 'static_sparse__seed0.json').read_text()
  )['trace']
  assert trace[-1][0] == 20
  # Statistics: the paired differences in the CSV are those of the cells.
  acc = {(c['point_sparsity'], c['algorithm'], c['seed']): float(c['accuracy']) for c in cells}
  d = [acc[('0.8', 'static_sparse', s)] - acc[('0.8', 'no_prune', s)] for s in ('0', '1')]
  assert float(by[('0.8', 'static_sparse')]['dense_diff']) == pytest.approx(np.mean(d))
  half = 12.706204736 * np.std(d, ddof=1) / np.sqrt(2)  # t(0.975, df=1)
  assert float(by[('0.8', 'static_sparse')]['dense_high']) == pytest.approx(np.mean(d) + half)
  md = (run_dir / 'results.md').read_text()
  assert md.count('## sparsity') == 2
  assert 'static_sparse 2.00x' in md and 'train 2x longer' in md  # the recipe line says it
  assert 'n ≥ ((t(0.975, n-1) + t(0.8, n-1))·sd(d)/|mean(d)|)²' in md
  page = (run_dir / 'report.html').read_text()
  # Self-contained: every plot embedded, nothing loaded from elsewhere.
  assert page.count('src="data:image/png;base64,') == 4
  assert re.search(r'(src|href)="(?!data:)', page) is None
  for name in ('accuracy_vs_sparsity', 'accuracy_vs_flops'):
    assert (run_dir / f'{name}.png').read_bytes()[:8] == PNG_HEADER


def test_sweep_configs():
  cfg = config_lib.load_config(
    None, {'sparsity': '0.9,0.5', 'sparsity_type': 'unstructured;nm_1,4'}
  )
  assert config_lib.points(cfg) == [
    ('unstructured', 0.5),
    ('unstructured', 0.9),
    ('nm_1,4', 0.5),
    ('nm_1,4', 0.9),
  ]
  with pytest.raises(compare.ConfigError, match='run it with run_sweep'):
    compare.run_comparison(cfg)
  with pytest.raises(compare.ConfigError, match=r'sparsity lists a value twice: \[0.5, 0.5\]'):
    config_lib.load_config(None, {'sparsity': [0.5, 0.5]})
  with pytest.raises(compare.ConfigError, match=r'got 1.2'):
    config_lib.load_config(None, {'sparsity': '0.5,1.2'})
  with pytest.raises(compare.ConfigError, match='training_budget must be one of'):
    config_lib.load_config(None, {'training_budget': 'equal_time'})
  with pytest.raises(compare.ConfigError, match="Unknown sparsity type 'diagonal'"):
    config_lib.load_config(None, {'sparsity_type': ['unstructured', 'diagonal']})


def test_equal_flops_budget():
  from prunax.compare import runner

  cfg = config_lib.load_config(None, {'sparsity': 0.9, 'training_budget': 'equal_flops'})
  task = compare.digits_task()
  example = task.example_params()
  counter = runner._flops_counter(task, example)
  if counter is None:
    pytest.skip('prunax.flops is not available')
  names = ['no_prune', 'magnitude', 'static_sparse', 'rigl']
  updaters = {a: config_lib.make_updater(cfg, a, 0) for a in names}
  mult = runner.step_multipliers(cfg, updaters, example, counter)
  assert mult['no_prune'] == mult['magnitude'] == 1.0
  # Static sparse training at 90% spends a fraction of gradual pruning's FLOPs per step: it
  # trains longer, up to the cap.
  assert 1.0 < mult['static_sparse'] <= 5.0
  assert mult['rigl'] == pytest.approx(mult['static_sparse'])  # same target masks
  # Equal FLOPs: multiplier x F(static masks) = mean F along magnitude's gradual schedule.
  targets = updaters['static_sparse'].target_sparsities(example)
  f_sparse = counter.training_fraction(runner._params_at(example, targets, 1.0))
  f_dense = counter.training_fraction(runner._params_at(example, targets, 0.0))
  assert f_dense == pytest.approx(1.0)
  assert f_sparse < mult['static_sparse'] * f_sparse < f_dense
  capped = runner.step_multipliers(dict(cfg, max_step_multiplier=1), updaters, example, counter)
  assert capped['static_sparse'] == 1.0
  with pytest.raises(compare.ConfigError, match='equal_flops needs the task'):
    runner.step_multipliers(cfg, updaters, example, None)


def test_paired_difference_and_seeds_needed():
  from scipy import stats as scipy_stats

  from prunax.compare import stats

  a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.90, 0.91, 0.92]
  d = np.subtract(a, b)
  result = stats.paired(a, b)
  half = 3.182446305 * d.std(ddof=1) / 2  # t(0.975, df=3), sqrt(4) = 2
  assert (result.mean, result.low, result.high) == pytest.approx(
    (d.mean(), d.mean() - half, d.mean() + half)
  )
  assert result.significant == (scipy_stats.ttest_rel(a, b).pvalue < 0.05)
  one = stats.paired([0.9], [0.8])
  assert (one.low, one.significant, one.seeds_needed) == (None, False, None)
  # gap = sd: n = 9 gives ((2.306 + 0.889) * 1)^2 = 10.2 > 9; n = 10 gives 9.89 <= 10.
  assert stats.seeds_needed(0.01, 0.01) == 10
  assert stats.seeds_needed(0.0, 0.01) is None
  with pytest.raises(ValueError, match='equally long'):
    stats.paired([1.0], [1.0, 2.0])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=8))
def test_significance_agrees_with_the_paired_t_test(pairs):
  from scipy import stats as scipy_stats

  from prunax.compare import stats

  a, b = [p[0] for p in pairs], [p[1] for p in pairs]
  d = np.subtract(a, b)
  hypothesis.assume(d.std(ddof=1) > 1e-6)
  p = scipy_stats.ttest_rel(a, b).pvalue
  hypothesis.assume(abs(p - 0.05) > 1e-6)  # no ties at the boundary
  assert stats.paired(a, b).significant == (p < 0.05)
  n = stats.seeds_needed(float(d.mean()), float(d.std(ddof=1)))
  if n is not None and 2 < n < stats.MAX_SEEDS:  # the smallest n meeting the inequality
    ratio = d.std(ddof=1) / abs(d.mean())
    need = lambda k: (
      ((scipy_stats.t.ppf(0.975, k - 1) + scipy_stats.t.ppf(0.8, k - 1)) * ratio) ** 2
    )
    assert n >= need(n) and n - 1 < need(n - 1)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12)
)
def test_pareto_front(points):
  from prunax.compare import plots

  xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
  front = plots.pareto_front(xs, ys)
  dominated = lambda i: any(
    xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i]) for j in range(len(xs))
  )
  assert all(not dominated(i) for i in front)
  # Every point off the front is dominated or duplicates a front point.
  assert all(
    dominated(i) or (xs[i], ys[i]) in {(xs[j], ys[j]) for j in front}
    for i in range(len(xs))
    if i not in front
  )
  assert [xs[i] for i in front] == sorted(xs[i] for i in front)


def test_noisy_digits_is_deterministic_and_harder():
  a, b = tasks.noisy_digits_task(), tasks.noisy_digits_task()
  assert a.train_data[0].shape == (4 * 1258, 20, 20, 1)
  assert a.eval_data[0].shape == (2 * 539, 20, 20, 1)
  np.testing.assert_array_equal(a.train_data[0], b.train_data[0])
  np.testing.assert_array_equal(a.eval_data[1], b.eval_data[1])
  # The noise is there: the pixels of a blank border differ from zero.
  assert 0.2 < a.train_data[0][..., 0].std() and np.abs(a.train_data[0]).max() > 1.0
  assert 'noisy_digits' in compare.available_tasks()

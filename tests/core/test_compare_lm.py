"""The language-model task of ``prunax compare`` and the metric direction (perplexity:
lower is better) through the runner, report, plots, statistics and command."""

import csv
import dataclasses
import math
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import prunax
from prunax import cli
from prunax import compare
from prunax import sparsity_types
from prunax.compare import config as config_lib
from prunax.compare import plots
from prunax.compare import report
from prunax.compare import stats
from prunax.compare import tasks
from prunax.compare import tasks_lm

TINY = {'d': 32, 'layers': 1, 'heads': 2, 'seq': 32, 'stride': 64, 'eval_windows': 32}


def test_text_split_is_deterministic_and_in_order():
  train, held_out, vocab = tasks_lm.load_text()
  again = tasks_lm.load_text()
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(held_out, again[1])
  assert len(train) == int(0.9 * (len(train) + len(held_out)))
  assert vocab > 60 and train.max() < vocab and held_out.max() < vocab
  with pytest.raises(ValueError, match=r'train_fraction must lie in \(0, 1\), got 1.0'):
    tasks_lm.load_text(1.0)


def test_task_windows_predict_the_next_character():
  task = tasks.make_task('lm', TINY)
  x, y = task.train_data
  assert x.shape == y.shape and x.shape[1] == 32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets: inputs shifted by one
  train, held_out, _ = tasks_lm.load_text()
  np.testing.assert_array_equal(x[1], train[64 : 64 + 32])  # stride 64
  np.testing.assert_array_equal(task.eval_data[0][1], held_out[33 : 33 + 32])
  assert (task.name, task.metric_name, task.higher_is_better) == ('lm', 'perplexity', False)
  assert 'lm' in compare.available_tasks()
  with pytest.raises(ValueError, match=r'd \(30\) must be a multiple of heads \(4\)'):
    tasks_lm.lm_task(d=30, heads=4)
  with pytest.raises(ValueError, match='eval_windows must be an integer >= 1, got 0'):
    tasks_lm.lm_task(eval_windows=0)


def test_unigram_perplexity_formula():
  train = np.array([0, 0, 0, 1])
  test = np.array([0, 1, 2])
  # add-one counts 4, 2, 1 over 7
  expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
  assert tasks_lm.unigram_perplexity(train, test, 3) == pytest.approx(expected)


def test_perplexity_is_exp_of_cross_entropy():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]], np.float32))
  targets = np.array([[0, 1]])
  expected = math.exp(-(math.log(0.5) + math.log(0.8)) / 2)
  assert float(tasks_lm.perplexity(logits, targets)) == pytest.approx(expected, rel=1e-5)


def test_trained_tiny_lm_is_below_unigram():
  task = tasks_lm.lm_task(**TINY)
  dense = prunax.create_updater_from_config({'algorithm': 'no_prune', 'sparsity': 0.0})
  untrained = task.run(dense, 0, 1, lambda *a: None, 1).metric
  trained = task.run(dense, 0, 150, lambda *a: None, 150).metric
  # Near-uniform over the characters at the start, far below the unigram model after.
  assert untrained > task.unigram_perplexity
  assert trained < 0.6 * task.unigram_perplexity, (trained, task.unigram_perplexity)


def _fake(metrics: dict[str, list[float]], higher_is_better: bool) -> compare.Comparison:
  seeds = list(range(len(next(iter(metrics.values())))))
  cells = {
    (a, s): {'metric': m[s], 'target_sparsity': 0.0, 'steps': 10, 'sparsity': 0.5}
    for a, m in metrics.items()
    for s in seeds
  }
  category = {'origin': 'dense-to-sparse', 'dynamics': 'dynamic', 'structure': 'unstructured'}
  cfg = config_lib.load_config(None, {'seeds': seeds, 'steps': 10})
  return compare.Comparison(
    config=cfg,
    task_name='toy',
    metric_name='perplexity' if not higher_is_better else 'accuracy',
    algorithms=list(metrics),
    categories={a: dict(category) for a in metrics},
    cells=cells,
    layer_targets={},
    run_dir='',
    skipped=[],
    higher_is_better=higher_is_better,
  )


@pytest.mark.parametrize('higher_is_better', [True, False])
def test_best_and_differences_follow_the_metric_direction(higher_is_better):
  metrics = {
    'no_prune': [5.0, 5.1, 5.2],
    'magnitude': [6.0, 6.2, 6.1],
    'random': [9.0, 9.5, 9.2],
  }
  comparison = _fake(metrics, higher_is_better)
  best = 'random' if higher_is_better else 'magnitude'
  assert report.best_algorithm(comparison) == best
  rows = {r['algorithm']: r for r in report.rows(comparison)}
  other = 'magnitude' if higher_is_better else 'random'
  # Δ is metric(algorithm) - metric(best), in the metric's units, whatever the direction.
  assert rows[other]['best_diff'] == pytest.approx(np.mean(metrics[other]) - np.mean(metrics[best]))
  assert rows[other]['best_significant']
  assert rows[best]['best_diff'] is None
  better, sign = ('Higher', 'negative') if higher_is_better else ('Lower', 'positive')
  md = report.markdown(comparison)
  assert f'{better} {comparison.metric_name} is better: a {sign} Δ is a loss' in md
  header, body = report.text_table(comparison)
  assert [line[4] for line in body if line[0] == best] == ['best']


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  st.dictionaries(
    st.sampled_from(list('abcdef')),
    st.one_of(st.floats(-1e6, 1e6), st.just(float('nan'))),
    max_size=6,
  ),
  st.booleans(),
)
def test_stats_best_is_the_extreme_finite_mean(means, higher_is_better):
  best = stats.best(means, higher_is_better)
  finite = {k: v for k, v in means.items() if math.isfinite(v)}
  if not finite:
    assert best is None
  else:
    pick = max if higher_is_better else min
    assert means[best] == pick(finite.values())


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12)
)
def test_pareto_front_lower_is_better_mirrors_higher(points):
  xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
  lower = plots.pareto_front(xs, ys, higher_is_better=False)
  assert lower == plots.pareto_front(xs, [-y for y in ys])
  dominated = lambda i: any(
    xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i]) for j in range(len(xs))
  )
  assert all(not dominated(i) for i in lower)


def test_task_direction_must_be_a_bool(tmp_path):
  task = dataclasses.replace(tasks.digits_task(), higher_is_better='no')
  with pytest.raises(compare.ConfigError, match="higher_is_better='no'; it must be True"):
    compare.run_comparison(
      {'algorithms': ['no_prune'], 'seeds': 1, 'steps': 1, 'run_dir': str(tmp_path)}, task
    )


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp('compare_lm') / 'run')
  rc = cli.main(
    [
      'compare',
      '--task',
      'lm',
      '--set',
      'task_args={d: 32, layers: 1, heads: 2, seq: 32, stride: 64, eval_windows: 32}',
      '--algorithms',
      'no_prune,magnitude,random',
      '--set',
      'optional_algorithms=[]',
      '--sparsity',
      '0.5,0.9',
      '--seeds',
      '2',
      '--steps',
      '30',
      '--run-dir',
      run_dir,
      '--no-progress',
      '--no-compile-cache',
    ]
  )
  assert rc == 0
  return run_dir


def test_lm_comparison_reports_lower_is_better(lm_run):
  with open(os.path.join(lm_run, 'results.csv'), newline='') as f:
    table = list(csv.DictReader(f))
  assert {r['point_sparsity'] for r in table} == {'0.5', '0.9'}
  for point in ('0.5', '0.9'):
    rows = {r['algorithm']: r for r in table if r['point_sparsity'] == point}
    means = {a: float(r['perplexity_mean']) for a, r in rows.items()}
    pruned = {a: m for a, m in means.items() if a != 'no_prune'}
    best = min(pruned, key=pruned.get)
    assert rows[best]['best_diff'] == ''  # the best has no difference to itself
    for a in pruned:
      if a != best:
        assert float(rows[a]['best_diff']) == pytest.approx(pruned[a] - pruned[best], abs=1e-6)
        assert float(rows[a]['best_diff']) > 0  # a higher perplexity than the best
  with open(os.path.join(lm_run, 'results.md')) as f:
    md = f.read()
  assert 'Lower perplexity is better' in md and '| perplexity |' in md
  for name in ('accuracy_vs_sparsity', 'accuracy_vs_flops'):
    assert os.path.getsize(os.path.join(lm_run, f'{name}.png')) > 1000


def test_lm_task_trains_with_the_whole_updater_config(tmp_path, monkeypatch):
  cfg = compare.load_config(
    None,
    {
      'task': 'lm',
      'task_args': TINY,
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
  result = compare.run_comparison(cfg)
  assert result.higher_is_better is False
  cell = result.cells[('magnitude', 3)]
  assert cell['metric'] > 1.0  # a perplexity
  # Half the output channels of every kernel from step 1 on (biases and norms stay dense,
  # up to a few weights that are exactly zero).
  assert 0.3 < cell['sparsity'] < 0.51
  expected = config_lib.make_updater(cfg, 'magnitude', 3)
  assert (expected.sparsity_type, expected.scheduler.power) == (
    sparsity_types.from_string('channel_-1'),
    2.0,
  )
  # One step is compiled for every seed (seed 0; the seed is traced state).
  wrapped = [u for u in wrapped if isinstance(u.seed, int)]
  assert wrapped and all(dataclasses.replace(u, seed=3) == expected for u in wrapped)


def test_shipped_lm_sweep_config():
  cfg = compare.load_config('sweep_lm')
  assert cfg['task'] == 'lm' and config_lib.is_sweep(cfg)
  assert 'no_prune' in cfg['algorithms'] and len(cfg['seeds']) >= 3

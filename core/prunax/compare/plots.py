"""PNG figures of a comparison (matplotlib, non-interactive backend)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from prunax.compare import report

_MARKERS = {'dense': 'o', 'dense-to-sparse': 's', 'sparse-to-sparse': '^'}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def accuracy_vs_sparsity(comparison: Any, path: str) -> None:
  """Metric against achieved sparsity, one point per algorithm, error bars = std over seeds."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  metric = comparison.metric_name
  for row in report.rows(comparison):
    if row['sparsity_mean'] is None or row[f'{metric}_mean'] is None:
      continue
    ax.errorbar(row['sparsity_mean'], row[f'{metric}_mean'], xerr=row['sparsity_std'],
                yerr=row[f'{metric}_std'], marker=_MARKERS.get(row['origin'], 'D'),
                capsize=3, linestyle='none', label=f'{row["algorithm"]} ({row["origin"]})')
    ax.annotate(row['algorithm'], (row['sparsity_mean'], row[f'{metric}_mean']),
                textcoords='offset points', xytext=(4, 4), fontsize=7)
  ax.set_xlabel('achieved sparsity')
  ax.set_ylabel(f'final {metric}')
  ax.set_title(f'{comparison.task_name}: {metric} vs sparsity '
               f'(mean ± std, {len(comparison.config["seeds"])} seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def layer_sparsity(comparison: Any, path: str) -> None:
  """Per-layer sparsity: uniform and ERK targets, and the allocation measured for
  AutoSparse and global magnitude pruning when they were run (seed mean)."""
  plt = _pyplot()
  series = {f'{d} (target)': t for d, t in comparison.layer_targets.items()}
  for algorithm in ('autosparse', 'global_magnitude'):
    if algorithm in comparison.algorithms:
      cells = [comparison.cells[(algorithm, s)] for s in comparison.config['seeds']]
      names = cells[0]['layer_sparsity']
      series[f'{algorithm} (measured)'] = {
          n: float(np.mean([c['layer_sparsity'][n] for c in cells])) for n in names}
  layers = sorted({n for s in series.values() for n in s})
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4.5))
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(layers))
  for i, (label, values) in enumerate(series.items()):
    ax.bar(x + i * width, [values.get(n, np.nan) for n in layers], width, label=label)
  ax.set_xticks(x + 0.4 - width / 2, [n.removeprefix('params/') for n in layers], rotation=20,
                fontsize=8)
  ax.set_ylabel('sparsity')
  ax.set_ylim(0, 1)
  title = f'per-layer sparsity at {comparison.config["sparsity"]}'
  if 'autosparse' not in comparison.algorithms:
    title += ' (AutoSparse not run)'
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def sparsity_over_steps(comparison: Any, path: str) -> None:
  """Total sparsity of the params over training, seed mean, one line per algorithm."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for algorithm in comparison.algorithms:
    traces = [comparison.cells[(algorithm, s)]['trace'] for s in comparison.config['seeds']]
    if not traces[0]:
      continue
    steps = [t[0] for t in traces[0]]
    mean = np.mean([[p[1] for p in t] for t in traces], axis=0)
    ax.plot(steps, mean, label=algorithm, marker='.')
  ax.set_xlabel('training step')
  ax.set_ylabel('total sparsity')
  ax.set_ylim(-0.02, 1)
  ax.set_title(f'{comparison.task_name}: sparsity over training')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_plots(comparison: Any) -> dict[str, str]:
  """Writes the three PNGs in the run directory; returns their paths."""
  paths = {}
  for fn in (accuracy_vs_sparsity, layer_sparsity, sparsity_over_steps):
    if fn is layer_sparsity and not comparison.layer_targets:
      continue
    paths[fn.__name__] = os.path.join(comparison.run_dir, f'{fn.__name__}.png')
    fn(comparison, paths[fn.__name__])
  return paths

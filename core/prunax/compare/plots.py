"""PNG figures of a comparison or sweep (matplotlib, non-interactive backend)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from prunax.compare import report

_MARKERS = {'dense': 'o', 'dense-to-sparse': 's', 'sparse-to-sparse': '^'}


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _points(result: Any) -> list[Any]:
  return list(getattr(result, 'points', [result]))


def _colors(algorithms: list[str]) -> dict[str, Any]:
  plt = _pyplot()
  n = 10 if len(algorithms) <= 10 else 20
  cmap = plt.get_cmap(f'tab{n}')
  return {a: cmap(i % n) for i, a in enumerate(algorithms)}


def _algorithms(result: Any) -> list[str]:
  out: list[str] = []
  for c in _points(result):
    out += [a for a in c.algorithms if a not in out]
  return out


def accuracy_vs_sparsity(result: Any, path: str) -> None:
  """Metric against achieved sparsity (seed mean): per sparsity type a panel, per algorithm
  a line through the seed means of the sweep's points with a band of ± one standard
  deviation over seeds; the dense baseline as a dashed line (its band shaded grey)."""
  plt = _pyplot()
  points = _points(result)
  types = list(dict.fromkeys(c.config['sparsity_type'] for c in points))
  fig, axes = plt.subplots(1, len(types), figsize=(7 * len(types), 5), squeeze=False)
  metric = points[0].metric_name
  colors = _colors(_algorithms(result))
  for ax, stype in zip(axes[0], types):
    here = [c for c in points if c.config['sparsity_type'] == stype]
    table = {c.config['sparsity']: {r['algorithm']: r for r in report.rows(c)} for c in here}
    xs = sorted(table)
    for algorithm in _algorithms(result):
      pts = [
        (x, table[x][algorithm])
        for x in xs
        if algorithm in table[x] and table[x][algorithm][f'{metric}_mean'] is not None
      ]
      if not pts:
        continue
      mean = np.array([r[f'{metric}_mean'] for _, r in pts])
      std = np.array([r[f'{metric}_std'] for _, r in pts])
      # Achieved sparsity (learned-sparsity methods miss the target), else the target.
      x = np.array([p if r['sparsity_mean'] is None else r['sparsity_mean'] for p, r in pts])
      if algorithm == 'no_prune':
        ax.axhline(mean.mean(), color='k', linestyle='--', linewidth=1, label='no_prune (dense)')
        ax.axhspan(mean.mean() - std.mean(), mean.mean() + std.mean(), color='grey', alpha=0.15)
        continue
      origin = pts[0][1]['origin']
      ax.plot(
        x,
        mean,
        marker=_MARKERS.get(origin, 'D'),
        color=colors[algorithm],
        label=f'{algorithm} ({origin})',
      )
      ax.fill_between(x, mean - std, mean + std, color=colors[algorithm], alpha=0.15)
    ax.set_xlabel('achieved sparsity')
    ax.set_ylabel(_metric_label(result))
    ax.set_title(
      f'{points[0].task_name} ({stype}): {metric} vs sparsity\n'
      f'mean ± std over {len(points[0].config["seeds"])} seeds'
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _metric_label(result: Any) -> str:
  better = 'higher' if report.higher_is_better(result) else 'lower'
  return f'final {_points(result)[0].metric_name} ({better} is better)'


def pareto_front(xs: list[float], ys: list[float], higher_is_better: bool = True) -> list[int]:
  """Indices of the points no other point beats (lower or equal x and better or equal y, one
  of them strictly; better is higher, or lower when ``higher_is_better`` is False), by
  ascending x."""
  sign = 1.0 if higher_is_better else -1.0
  order = sorted(range(len(xs)), key=lambda i: (xs[i], -sign * ys[i]))
  front, best = [], -np.inf
  for i in order:
    if sign * ys[i] > best:
      front.append(i)
      best = sign * ys[i]
  return front


def accuracy_vs_flops(result: Any, path: str) -> None:
  """Metric against training and inference FLOPs (fractions of dense), one marker per
  (algorithm, sparsity) seed mean, with the Pareto front (no point cheaper and better)
  drawn as a step line and its points circled."""
  plt = _pyplot()
  points = _points(result)
  metric = points[0].metric_name
  colors = _colors(_algorithms(result))
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for ax, key, title in (
    (axes[0], 'training_flops', 'training FLOPs'),
    (axes[1], 'inference_flops', 'inference FLOPs'),
  ):
    xs, ys, labels = [], [], []
    for c in points:
      for r in report.rows(c):
        if r[f'{key}_mean'] is None or r[f'{metric}_mean'] is None:
          continue
        xs.append(r[f'{key}_mean'])
        ys.append(r[f'{metric}_mean'])
        labels.append((r['algorithm'], r['origin'], c.config['sparsity']))
    if not xs:
      ax.text(0.5, 0.5, f'{title} not measured', ha='center', transform=ax.transAxes)
      continue
    seen = set()
    for x, y, (algorithm, origin, sp) in zip(xs, ys, labels):
      ax.scatter(
        x,
        y,
        color=colors[algorithm],
        marker=_MARKERS.get(origin, 'D'),
        s=30,
        label=None if algorithm in seen else algorithm,
      )
      seen.add(algorithm)
      if len(points) > 1 and algorithm != 'no_prune':
        ax.annotate(f'{sp:g}', (x, y), textcoords='offset points', xytext=(3, 3), fontsize=6)
    front = pareto_front(xs, ys, report.higher_is_better(result))
    ax.step(
      [xs[i] for i in front],
      [ys[i] for i in front],
      where='post',
      color='k',
      linewidth=1,
      label='Pareto front',
    )
    ax.scatter(
      [xs[i] for i in front], [ys[i] for i in front], s=120, facecolors='none', edgecolors='k'
    )
    ax.set_xscale('log')
    ax.set_xlabel(f'{title} (fraction of dense, log scale)')
    ax.set_ylabel(_metric_label(result))
    ax.set_title(f'{points[0].task_name}: {metric} vs {title}')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
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
        n: float(np.mean([c['layer_sparsity'][n] for c in cells])) for n in names
      }
  layers = sorted({n for s in series.values() for n in s})
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(layers) + 2), 4.5))
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(layers))
  for i, (label, values) in enumerate(series.items()):
    ax.bar(x + i * width, [values.get(n, np.nan) for n in layers], width, label=label)
  ax.set_xticks(
    x + 0.4 - width / 2, [n.removeprefix('params/') for n in layers], rotation=20, fontsize=8
  )
  ax.set_ylabel('sparsity')
  ax.set_ylim(0, 1)
  title = f'per-layer sparsity at {comparison.config["sparsity"]}'
  if 'autosparse' not in comparison.algorithms:
    title += ' (AutoSparse not run)'
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
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
  ax.set_title(
    f'{comparison.task_name}: sparsity over training (target {comparison.config["sparsity"]})'
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _detail_point(result: Any) -> Any:
  """The point whose per-layer sparsity and trace are plotted: 0.8 if swept, else the
  highest sparsity of the first sparsity type."""
  points = _points(result)
  first = [c for c in points if c.config['sparsity_type'] == points[0].config['sparsity_type']]
  for c in first:
    if c.config['sparsity'] == 0.8:
      return c
  return first[-1]


def write_plots(result: Any) -> dict[str, str]:
  """Writes the PNGs in the run directory of a Comparison or Sweep; returns their paths."""
  paths = {}
  detail = _detail_point(result)
  for fn, arg in (
    (accuracy_vs_sparsity, result),
    (accuracy_vs_flops, result),
    (layer_sparsity, detail),
    (sparsity_over_steps, detail),
  ):
    if fn is layer_sparsity and not detail.layer_targets:
      continue
    paths[fn.__name__] = os.path.join(result.run_dir, f'{fn.__name__}.png')
    fn(arg, paths[fn.__name__])
  return paths

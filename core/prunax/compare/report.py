"""Tables of a comparison: mean and standard deviation over seeds, paired differences to
dense and to the best method with 95% intervals, on the terminal (rich), as Markdown, CSV
and a self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from typing import Any

import numpy as np

from prunax.compare import stats

# (key in a cell, column title, format of the mean, scale)
FIGURES = (
  ('metric', None, '{:.4f}', 1.0),
  ('sparsity', 'sparsity', '{:.4f}', 1.0),
  ('training_flops', 'train FLOPs', '{:.3f}', 1.0),
  ('inference_flops', 'infer FLOPs', '{:.3f}', 1.0),
  ('mask_memory', 'mask memory', '{:.3f}', 1.0),
  ('seconds_per_step', 'ms/step', '{:.2f}', 1e3),
)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (ddof=1; 0 for one value); None if any is None."""
  if not values or any(v is None for v in values):
    return None, None
  arr = np.asarray(values, dtype=np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def higher_is_better(result: Any) -> bool:
  """The metric direction of a Comparison or Sweep (True for objects without one)."""
  return bool(getattr(result, 'higher_is_better', True))


def best_algorithm(comparison: Any) -> str | None:
  """The algorithm other than ``no_prune`` with the best mean metric: the highest, or the
  lowest when the task's metric is lower-is-better (None if none is finite)."""
  means = {
    a: float(np.mean([comparison.cells[(a, s)]['metric'] for s in comparison.config['seeds']]))
    for a in comparison.algorithms
    if a != 'no_prune'
  }
  return stats.best(means, higher_is_better(comparison))


def direction_note(result: Any) -> str:
  """Which way the metric is better, and what the sign of a Δ means."""
  metric = result.metric_name
  if higher_is_better(result):
    return f'Higher {metric} is better: a negative Δ is a loss against the reference.'
  return f'Lower {metric} is better: a positive Δ is a loss against the reference.'


def rows(comparison: Any) -> list[dict[str, Any]]:
  """One row per algorithm: categories, number of seeds and steps, ``<figure>_mean/_std``,
  and the paired differences of the metric to ``no_prune`` (``dense_*``) and to the best
  algorithm (``best_*``): ``_diff``, ``_low``, ``_high`` (95% t-interval), ``_significant``,
  ``_seeds_needed`` (see :mod:`prunax.compare.stats`)."""
  out = []
  seeds = comparison.config['seeds']
  metric = {a: [comparison.cells[(a, s)]['metric'] for s in seeds] for a in comparison.algorithms}
  best = best_algorithm(comparison)
  for algorithm in comparison.algorithms:
    cells = [comparison.cells[(algorithm, s)] for s in seeds]
    row: dict[str, Any] = {
      'algorithm': algorithm,
      **comparison.categories[algorithm],
      'seeds': len(cells),
      'steps': cells[0].get('steps'),
      'target_sparsity': cells[0]['target_sparsity'],
    }
    for key, _, _, _ in FIGURES:
      name = comparison.metric_name if key == 'metric' else key
      row[f'{name}_mean'], row[f'{name}_std'] = mean_std([c.get(key) for c in cells])
    for ref, other in (('dense', 'no_prune'), ('best', best)):
      result = None
      if other in metric and other != algorithm:
        result = stats.paired(metric[algorithm], metric[other])
      for field in ('diff', 'low', 'high', 'significant', 'seeds_needed'):
        value = None if result is None else getattr(result, 'mean' if field == 'diff' else field)
        row[f'{ref}_{field}'] = value
    out.append(row)
  return out


def _diff_text(row: dict[str, Any], ref: str) -> str:
  diff = row[f'{ref}_diff']
  if diff is None:
    return 'best' if ref == 'best' and row['algorithm'] != 'no_prune' else '-'
  if row[f'{ref}_low'] is None:
    return f'{diff:+.4f}'
  half = (row[f'{ref}_high'] - row[f'{ref}_low']) / 2
  return f'{diff:+.4f} ± {half:.4f}' + (' *' if row[f'{ref}_significant'] else '')


def _needed_text(row: dict[str, Any]) -> str:
  parts = [row['dense_seeds_needed'], row['best_seeds_needed']]
  return ' / '.join(
    '-' if n is None else (f'≥{n}' if n >= stats.MAX_SEEDS else str(n)) for n in parts
  )


def _cell_text(row: dict[str, Any], name: str, fmt: str, scale: float) -> str:
  mean, std = row[f'{name}_mean'], row[f'{name}_std']
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return 'n/a'
  return f'{fmt.format(mean * scale)} ± {fmt.format(std * scale)}'


def _columns(comparison: Any) -> list[tuple[str, str, str, float]]:
  return [
    (
      comparison.metric_name if key == 'metric' else key,
      comparison.metric_name if title is None else title,
      fmt,
      scale,
    )
    for key, title, fmt, scale in FIGURES
  ]


_SHORT = {
  'dense-to-sparse': 'D→S',
  'sparse-to-sparse': 'S→S',
  'unstructured': 'unstr.',
  'structured': 'struct.',
}


def text_table(comparison: Any, short: bool = False) -> tuple[list[str], list[list[str]]]:
  """Header and rows of strings ('mean ± std', 'n/a' when not measured).

  Args:
    comparison: the comparison.
    short: abbreviate the categories (D→S: dense-to-sparse, S→S: sparse-to-sparse).
  """
  columns = _columns(comparison)
  titles = [title for _, title, _, _ in columns]
  header = [
    'algorithm',
    'category',
    titles[0],
    'Δ dense (95% CI)',
    'Δ best (95% CI)',
    'seeds needed',
  ] + titles[1:]
  multipliers = [r['steps'] for r in rows(comparison)]
  if len(set(multipliers)) > 1:
    header.insert(2, 'steps')
  body = []
  for row in rows(comparison):
    parts = [row['origin'], row['dynamics'], row['structure']]
    cat = ' '.join(_SHORT.get(p, p) for p in parts) if short else ', '.join(parts)
    cells = [_cell_text(row, name, fmt, scale) for name, _, fmt, scale in columns]
    line = [
      row['algorithm'],
      cat,
      cells[0],
      _diff_text(row, 'dense'),
      _diff_text(row, 'best'),
      _needed_text(row),
    ] + cells[1:]
    if len(set(multipliers)) > 1:
      line.insert(2, str(row['steps']))
    body.append(line)
  return header, body


STATS_NOTE = (
  'Δ: paired difference of the metric to the dense baseline (no_prune) and to the best '
  'algorithm of the table, over the same seeds (same init and batches), mean ± half-width '
  'of the 95% t-interval (mean(d) ± t(0.975, n-1)·sd(d)/√n); * the interval excludes 0. '
  'Seeds needed (to dense / to best): the smallest n with '
  'n ≥ ((t(0.975, n-1) + t(0.8, n-1))·sd(d)/|mean(d)|)², i.e. the seeds a paired t-test at '
  'level 0.05 needs to detect the observed gap with power 0.8.'
)


def recipe(comparison: Any) -> str:
  """The recipe line: task, steps, point, distribution, schedule, seeds, training budget."""
  cfg = comparison.config
  budget = cfg.get('training_budget', 'equal_steps')
  multipliers = {a: m for a, m in (cfg.get('step_multipliers') or {}).items() if m != 1.0}
  if budget == 'equal_steps':
    budget_text = 'equal steps for all'
  elif budget == 'equal_flops':
    budget_text = (
      'equal training FLOPs: sparse-to-sparse algorithms train until they spend '
      'those of gradual magnitude pruning (at most '
      f'{cfg["max_step_multiplier"]}x)'
    )
  else:
    budget_text = f'sparse-to-sparse algorithms train {budget:g}x longer'
  if multipliers:
    budget_text += ' (' + ', '.join(f'{a} {m:.2f}x' for a, m in multipliers.items()) + ')'
  return (
    f'{comparison.task_name}: {cfg["steps"]} steps, sparsity {cfg["sparsity"]} '
    f'({cfg["dist_type"]}, {cfg["sparsity_type"]}), schedule {cfg["schedule"]}, seeds '
    f'{cfg["seeds"]}; training budget: {budget_text}; mean ± std over seeds; FLOPs and '
    f'mask memory as fractions of dense. {direction_note(comparison)}'
  )


_caption = recipe


def _points(result: Any) -> list[Any]:
  """The comparisons of a Sweep, or ``[comparison]``."""
  return list(getattr(result, 'points', [result]))


def seeds_summary(result: Any) -> str:
  """How many seeds the observed gaps need (worst and median over the table's cells)."""
  parts = []
  for ref, what in (('dense', 'to dense'), ('best', 'to the best algorithm')):
    needed = [
      r[f'{ref}_seeds_needed']
      for c in _points(result)
      for r in rows(c)
      if r[f'{ref}_seeds_needed'] is not None
    ]
    if needed:
      parts.append(
        f'the {len(needed)} gaps {what} need {int(np.median(needed))} seeds '
        f'(median) and up to {max(needed)}'
        + (' (some gaps are too small to resolve)' if max(needed) >= stats.MAX_SEEDS else '')
      )
  seeds = len(_points(result)[0].config['seeds'])
  if not parts:
    return f'Seeds: {seeds}; with fewer than 2 seeds no interval or power analysis is possible.'
  return f'Seeds: this run has {seeds}; ' + '; '.join(parts) + '.'


def _md_table(comparison: Any) -> list[str]:
  header, body = text_table(comparison)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(r) + ' |' for r in body]


def markdown(result: Any, plots: dict[str, str] | None = None) -> str:
  """The tables (one per sweep point) as GitHub Markdown, with the recipe and statistics."""
  points = _points(result)
  lines = [f'# prunax compare: {points[0].task_name}', '']
  for comparison in points:
    if len(points) > 1:
      cfg = comparison.config
      lines += [f'## sparsity {cfg["sparsity"]} ({cfg["sparsity_type"]})', '']
    lines += [recipe(comparison), '', *_md_table(comparison), '']
  lines += [STATS_NOTE, '', seeds_summary(result)]
  skipped = sorted({s for c in points for s in c.skipped})
  if skipped:
    lines += ['', f'Optional algorithms skipped: {"; ".join(skipped)}.']
  for name, path in (plots or {}).items():
    lines += ['', f'![{name}]({os.path.basename(path)})']
  return '\n'.join(lines) + '\n'


def html_report(result: Any, plots: dict[str, str] | None = None) -> str:
  """One self-contained HTML page: the recipe, the tables, the statistics and the plots
  (PNG files embedded as base64 data URIs)."""
  points = _points(result)
  esc = html.escape
  parts = [
    '<!DOCTYPE html><html><head><meta charset="utf-8">',
    f'<title>prunax compare: {esc(points[0].task_name)}</title><style>'
    'body{font-family:sans-serif;margin:2em;max-width:1400px}'
    'table{border-collapse:collapse;font-size:13px;margin-bottom:1em}'
    'td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}'
    'td:first-child,td:nth-child(2),th{text-align:left}.sig{font-weight:bold}'
    'img{max-width:100%;display:block;margin:1em 0}</style></head><body>',
    f'<h1>prunax compare: {esc(points[0].task_name)}</h1>',
  ]
  for comparison in points:
    if len(points) > 1:
      cfg = comparison.config
      parts.append(f'<h2>sparsity {cfg["sparsity"]} ({esc(str(cfg["sparsity_type"]))})</h2>')
    header, body = text_table(comparison)
    parts.append(
      f'<p>{esc(recipe(comparison))}</p><table><tr>'
      + ''.join(f'<th>{esc(h)}</th>' for h in header)
      + '</tr>'
    )
    for r in body:
      parts.append(
        '<tr>'
        + ''.join(
          f'<td class="sig">{esc(c)}</td>' if c.endswith(' *') else f'<td>{esc(c)}</td>' for c in r
        )
        + '</tr>'
      )
    parts.append('</table>')
  parts.append(f'<p>{esc(STATS_NOTE)}</p><p>{esc(seeds_summary(result))}</p>')
  skipped = sorted({s for c in points for s in c.skipped})
  if skipped:
    parts.append(f'<p>Optional algorithms skipped: {esc("; ".join(skipped))}.</p>')
  for name, path in (plots or {}).items():
    with open(path, 'rb') as f:
      data = base64.b64encode(f.read()).decode('ascii')
    parts.append(
      f'<h3>{esc(name.replace("_", " "))}</h3>'
      f'<img alt="{esc(name)}" src="data:image/png;base64,{data}">'
    )
  parts.append('</body></html>')
  return '\n'.join(parts) + '\n'


def _point_fields(comparison: Any) -> dict[str, Any]:
  return {
    'point_sparsity': comparison.config['sparsity'],
    'sparsity_type': comparison.config['sparsity_type'],
  }


def write_csv(result: Any, path: str) -> None:
  """One row per (point, algorithm); empty fields where a figure was not measured."""
  table = [{**_point_fields(c), **row} for c in _points(result) for row in rows(c)]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    for row in table:
      writer.writerow({k: '' if v is None else v for k, v in row.items()})


def write_cells_csv(result: Any, path: str) -> None:
  """One row per (point, algorithm, seed) with the raw figures."""
  keys = [
    'algorithm',
    'seed',
    'metric',
    'sparsity',
    'training_flops',
    'inference_flops',
    'mask_memory',
    'seconds_per_step',
    'compile_seconds',
    'steps',
  ]
  points = _points(result)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      ['point_sparsity', 'sparsity_type']
      + [points[0].metric_name if k == 'metric' else k for k in keys]
    )
    for comparison in points:
      for algorithm in comparison.algorithms:
        for seed in comparison.config['seeds']:
          cell = comparison.cells[(algorithm, seed)]
          writer.writerow(
            list(_point_fields(comparison).values())
            + ['' if cell.get(k) is None else cell.get(k) for k in keys]
          )


def print_table(result: Any, console: Any = None) -> None:
  """Prints the table of every point with rich, then the statistics note."""
  from rich.console import Console
  from rich.table import Table

  console = console or Console()
  for comparison in _points(result):
    header, body = text_table(comparison, short=True)
    table = Table(
      title=f'prunax compare: {comparison.task_name} at sparsity '
      f'{comparison.config["sparsity"]} ({comparison.config["sparsity_type"]})',
      caption=recipe(comparison) + ' D→S: dense-to-sparse, S→S: sparse-to-sparse.',
    )
    for i, title in enumerate(header):
      table.add_column(title, justify='left' if i < 2 else 'right', no_wrap=True)
    for r in body:
      table.add_row(*r)
    console.print(table)
  console.print(STATS_NOTE)
  console.print(seeds_summary(result))


def write_reports(result: Any, plots: dict[str, str] | None = None) -> dict[str, str]:
  """Writes results.md, results.csv, cells.csv and report.html (with ``plots`` embedded) in
  the run directory of a Comparison or a Sweep; returns the paths."""
  paths = {
    name: os.path.join(result.run_dir, name)
    for name in ('results.md', 'results.csv', 'cells.csv', 'report.html')
  }
  with open(paths['results.md'], 'w') as f:
    f.write(markdown(result, plots))
  write_csv(result, paths['results.csv'])
  write_cells_csv(result, paths['cells.csv'])
  with open(paths['report.html'], 'w') as f:
    f.write(html_report(result, plots))
  return paths

"""Tables of a comparison: mean and standard deviation over seeds, on the terminal
(rich), as Markdown and as CSV."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

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


def rows(comparison: Any) -> list[dict[str, Any]]:
  """One row per algorithm: categories, number of seeds, and ``<figure>_mean/_std``."""
  out = []
  seeds = comparison.config['seeds']
  for algorithm in comparison.algorithms:
    cells = [comparison.cells[(algorithm, s)] for s in seeds]
    row: dict[str, Any] = {'algorithm': algorithm, **comparison.categories[algorithm],
                           'seeds': len(cells), 'target_sparsity': cells[0]['target_sparsity']}
    for key, _, _, _ in FIGURES:
      name = comparison.metric_name if key == 'metric' else key
      row[f'{name}_mean'], row[f'{name}_std'] = mean_std([c.get(key) for c in cells])
    out.append(row)
  return out


def _cell_text(row: dict[str, Any], name: str, fmt: str, scale: float) -> str:
  mean, std = row[f'{name}_mean'], row[f'{name}_std']
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return 'n/a'
  return f'{fmt.format(mean * scale)} ± {fmt.format(std * scale)}'


def _columns(comparison: Any) -> list[tuple[str, str, str, float]]:
  return [(comparison.metric_name if key == 'metric' else key,
           comparison.metric_name if title is None else title, fmt, scale)
          for key, title, fmt, scale in FIGURES]


_SHORT = {'dense-to-sparse': 'D→S', 'sparse-to-sparse': 'S→S', 'unstructured': 'unstr.',
          'structured': 'struct.'}


def text_table(comparison: Any, short: bool = False) -> tuple[list[str], list[list[str]]]:
  """Header and rows of strings ('mean ± std', 'n/a' when not measured).

  Args:
    comparison: the comparison.
    short: abbreviate the categories (D→S: dense-to-sparse, S→S: sparse-to-sparse).
  """
  columns = _columns(comparison)
  header = ['algorithm', 'category'] + [title for _, title, _, _ in columns]
  body = []
  for row in rows(comparison):
    parts = [row['origin'], row['dynamics'], row['structure']]
    cat = ' '.join(_SHORT.get(p, p) for p in parts) if short else ', '.join(parts)
    body.append([row['algorithm'], cat] + [_cell_text(row, name, fmt, scale)
                                           for name, _, fmt, scale in columns])
  return header, body


def _caption(comparison: Any) -> str:
  cfg = comparison.config
  return (f'{comparison.task_name}: {cfg["steps"]} steps, sparsity {cfg["sparsity"]} '
          f'({cfg["dist_type"]}, {cfg["sparsity_type"]}), schedule {cfg["schedule"]}, seeds '
          f'{cfg["seeds"]}; mean ± std over seeds; FLOPs and mask memory as fractions of dense.')


def markdown(comparison: Any) -> str:
  """The table as GitHub Markdown, with its caption."""
  header, body = text_table(comparison)
  lines = [f'# prunax compare: {comparison.task_name}', '', _caption(comparison), '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in body]
  if comparison.skipped:
    lines += ['', f'Optional algorithms skipped: {"; ".join(comparison.skipped)}.']
  return '\n'.join(lines) + '\n'


def write_csv(comparison: Any, path: str) -> None:
  """One row per algorithm; empty fields where a figure was not measured."""
  table = rows(comparison)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    for row in table:
      writer.writerow({k: '' if v is None else v for k, v in row.items()})


def write_cells_csv(comparison: Any, path: str) -> None:
  """One row per (algorithm, seed) with the raw figures."""
  keys = ['algorithm', 'seed', 'metric', 'sparsity', 'training_flops', 'inference_flops',
          'mask_memory', 'seconds_per_step', 'compile_seconds']
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([comparison.metric_name if k == 'metric' else k for k in keys])
    for algorithm in comparison.algorithms:
      for seed in comparison.config['seeds']:
        cell = comparison.cells[(algorithm, seed)]
        writer.writerow(['' if cell.get(k) is None else cell.get(k) for k in keys])


def print_table(comparison: Any, console: Any = None) -> None:
  """Prints the table with rich."""
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel
  console = console or Console()
  header, body = text_table(comparison, short=True)
  table = Table(title=f'prunax compare: {comparison.task_name}',
                caption=_caption(comparison) + ' D→S: dense-to-sparse, S→S: sparse-to-sparse.')
  for i, title in enumerate(header):
    table.add_column(title, justify='left' if i < 2 else 'right', no_wrap=True)
  for r in body:
    table.add_row(*r)
  console.print(table)


def write_reports(comparison: Any) -> dict[str, str]:
  """Writes results.md, results.csv and cells.csv in the run directory; returns the paths."""
  paths = {name: os.path.join(comparison.run_dir, name)
           for name in ('results.md', 'results.csv', 'cells.csv')}
  with open(paths['results.md'], 'w') as f:
    f.write(markdown(comparison))
  write_csv(comparison, paths['results.csv'])
  write_cells_csv(comparison, paths['cells.csv'])
  return paths

"""``prunax oneshot``: one-shot prune a model from a config, with a progress bar per layer.

The model comes from a function (``file.py:function`` or ``module:function``) returning a
dict with ``apply_fn`` (``apply_fn(params, batch)``), ``params`` and ``batches`` (the
calibration batches). Options come from the command line or a YAML config with the same
names (command line wins)::

    prunax oneshot --model benchmarks/oneshot_lm.py:get_model --method sparsegpt \\
        --sparsity 0.5 --sparsity-type 2:4 --out /tmp/pruned

Writes ``pruned_params.npz`` and ``masks.npz`` (arrays by parameter name, e.g.
``block_0/mlp_in/kernel``; masks of pruned leaves only) and ``table.md`` / ``table.csv``
(layer, shape, sparsity, reconstruction error, seconds) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

OPTIONS = {
  'model': None,
  'method': 'sparsegpt',
  'sparsity': 0.5,
  'sparsity_type': 'unstructured',
  'distribution': 'uniform',
  'sequential': True,
  'blocksize': None,
  'percdamp': None,
  'out': 'oneshot_out',
  'model_args': {},
}


class OneShotConfigError(ValueError):
  """A bad ``prunax oneshot`` config or model function."""


def add_parser(sub) -> None:
  """Adds the ``oneshot`` subcommand to an argparse subparsers object."""
  p = sub.add_parser(
    'oneshot',
    help='one-shot prune a trained model from calibration data',
    description='Prunes every matmul kernel of a trained model layer by layer from '
    'calibration batches (magnitude, Wanda or SparseGPT); writes the pruned '
    'params, masks and a per-layer table.',
  )
  p.add_argument('--config', help='YAML file with any of: ' + ', '.join(sorted(OPTIONS)))
  p.add_argument(
    '--model',
    help='file.py:function or module:function returning {"apply_fn", "params", "batches"}',
  )
  p.add_argument('--method', help='magnitude | wanda | sparsegpt (or a registered method)')
  p.add_argument('--sparsity', type=float, help='target sparsity in [0, 1)')
  p.add_argument('--sparsity-type', help='unstructured | N:M (e.g. 2:4), along each input')
  p.add_argument('--distribution', help='uniform | erk')
  p.add_argument(
    '--dense-inputs',
    action='store_true',
    help='calibrate every layer through the dense model (default: sequential)',
  )
  p.add_argument('--blocksize', type=int, help='SparseGPT column block (default 128)')
  p.add_argument('--percdamp', type=float, help='SparseGPT dampening (default 0.01)')
  p.add_argument('--out', help='output directory (default oneshot_out)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')


def load_options(args: argparse.Namespace) -> dict[str, Any]:
  """Defaults, then the YAML config, then the command line."""
  options = dict(OPTIONS)
  if args.config:
    import yaml

    try:
      with open(args.config) as f:
        loaded = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
      raise OneShotConfigError(f'cannot read config {args.config!r}: {e}') from e
    if not isinstance(loaded, Mapping):
      raise OneShotConfigError(f'config {args.config!r} must be a mapping, got {loaded!r}.')
    unknown = sorted(set(loaded) - set(OPTIONS))
    if unknown:
      raise OneShotConfigError(f'unknown config keys {unknown}; valid keys are {sorted(OPTIONS)}.')
    options.update(loaded)
  cli = {
    'model': args.model,
    'method': args.method,
    'sparsity': args.sparsity,
    'sparsity_type': args.sparsity_type,
    'distribution': args.distribution,
    'blocksize': args.blocksize,
    'percdamp': args.percdamp,
    'out': args.out,
  }
  options.update({k: v for k, v in cli.items() if v is not None})
  if args.dense_inputs:
    options['sequential'] = False
  if not options['model']:
    raise OneShotConfigError(
      'no model: pass --model file.py:function (or module:function), or "model:" in the config.'
    )
  return options


def load_model(spec: str, model_args: Mapping[str, Any]) -> dict[str, Any]:
  """Calls the model function named by ``spec``; checks the keys of what it returns."""
  module_name, _, attr = spec.partition(':')
  if not attr:
    raise OneShotConfigError(
      f'model must be "file.py:function" or "module:function", got {spec!r}.'
    )
  try:
    if module_name.endswith('.py'):
      if not os.path.isfile(module_name):
        raise OneShotConfigError(f'model file {module_name!r} does not exist.')
      name = 'prunax_oneshot_model_' + os.path.splitext(os.path.basename(module_name))[0]
      mod_spec = importlib.util.spec_from_file_location(name, module_name)
      module = importlib.util.module_from_spec(mod_spec)
      # Registered before it runs: dataclasses (flax modules) look their module up by name.
      sys.modules[name] = module
      mod_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except ImportError as e:
    raise OneShotConfigError(f'cannot import the model module {module_name!r}: {e}') from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise OneShotConfigError(f'model module {module_name!r} has no function {attr!r}.')
  model = fn(**dict(model_args))
  missing = [
    k for k in ('apply_fn', 'params', 'batches') if not isinstance(model, Mapping) or k not in model
  ]
  if missing:
    raise OneShotConfigError(
      f'model function {spec!r} must return a dict with apply_fn, params '
      f'and batches; missing {missing}.'
    )
  return dict(model)


def write_outputs(out: str, result) -> dict[str, str]:
  """Writes params, masks and the table; returns the paths by kind."""
  from prunax import sparsity_distributions
  from prunax.oneshot import driver

  os.makedirs(out, exist_ok=True)
  paths = {
    k: os.path.join(out, f)
    for k, f in (
      ('params', 'pruned_params.npz'),
      ('masks', 'masks.npz'),
      ('md', 'table.md'),
      ('csv', 'table.csv'),
    )
  }
  named = sparsity_distributions.named_leaves
  np.savez(paths['params'], **{n: np.asarray(x) for n, x in named(result.params)})
  masks = named(result.masks, is_leaf=lambda x: x is None)
  np.savez(paths['masks'], **{n: np.asarray(m) for n, m in masks if m is not None})
  with open(paths['md'], 'w') as f:
    f.write(driver.format_table(result.table) + '\n')
  with open(paths['csv'], 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['layer', 'in', 'out', 'sparsity', 'error', 'seconds'])
    for r in result.table:
      writer.writerow(
        [r.layer, r.shape[0], r.shape[1], f'{r.sparsity:.6f}', f'{r.error:.6f}', f'{r.seconds:.4f}']
      )
  return paths


def run(args: argparse.Namespace) -> int:
  """Runs ``prunax oneshot``; returns the exit status."""
  from rich.console import Console
  from rich.progress import BarColumn
  from rich.progress import MofNCompleteColumn
  from rich.progress import Progress
  from rich.progress import TextColumn
  from rich.progress import TimeElapsedColumn
  from rich.table import Table

  from prunax.oneshot import driver

  options = load_options(args)
  model = load_model(options['model'], options['model_args'] or {})
  kwargs = {k: options[k] for k in ('blocksize', 'percdamp') if options[k] is not None}
  console = Console()
  show = not args.no_progress and console.is_terminal
  with Progress(
    TextColumn('{task.description}'),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    console=console,
    disable=not show,
  ) as progress:
    task = progress.add_task(f'{options["method"]} (calibrating)', total=None)

    def on_layer(report, done, total):
      progress.update(
        task,
        completed=done,
        total=total,
        description=f'{options["method"]} {report.layer} err {report.error:.3f}',
      )

    try:
      result = driver.prune(
        model['apply_fn'],
        model['params'],
        model['batches'],
        method=options['method'],
        sparsity=float(options['sparsity']),
        sparsity_distribution=options['distribution'],
        sparsity_type=str(options['sparsity_type']),
        sequential=bool(options['sequential']),
        filter_fn=model.get('filter_fn'),
        progress=on_layer,
        **kwargs,
      )
    except TypeError as e:
      raise OneShotConfigError(f'method {options["method"]!r} does not take {kwargs}: {e}') from e
  table = Table(
    title=f'prunax oneshot: {options["method"]}, sparsity {options["sparsity"]}, '
    f'{options["sparsity_type"]}'
  )
  for col in ('layer', 'in x out', 'sparsity', 'rel. error', 'seconds'):
    table.add_column(col, justify='left' if col == 'layer' else 'right')
  for r in result.table:
    table.add_row(
      r.layer,
      f'{r.shape[0]}x{r.shape[1]}',
      f'{r.sparsity:.4f}',
      f'{r.error:.4f}',
      f'{r.seconds:.2f}',
    )
  console.print(table)
  paths = write_outputs(options['out'], result)
  console.print(f'Wrote {", ".join(paths.values())}')
  return 0

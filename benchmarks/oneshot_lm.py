"""One-shot pruning of a small character-level transformer LM: held-out perplexity table.

The text, model and training recipe are those of ``prunax compare``'s ``lm`` task
(:mod:`prunax.compare.tasks_lm`): the English documentation that ships with Python
(``pydoc_data.topics``; nothing is downloaded), a decoder-only transformer (flax linen)
trained with AdamW on the first 90% of the characters. Then every kernel of its blocks
(q, k, v, attention out, MLP in/out; not the embedding or the output head, as in the
papers) is pruned by ``prunax.oneshot.prune`` with magnitude, Wanda and SparseGPT, at 50%
unstructured, 2:4 and 4:8, from calibration windows drawn from the training text with 3
seeds. Held-out perplexity is measured on windows of the last 10%.

    python -m benchmarks.oneshot_lm                 # train (cached in --params), prune, table
    python -m benchmarks.oneshot_lm --steps 300 --seeds 1   # quick
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import subprocess
import tempfile
import time

import jax
import numpy as np

import prunax
from prunax import oneshot
from prunax.compare import tasks_lm

# The trained variables ({'params': ...} of the compare task's model).
CACHE = os.path.join(tempfile.gettempdir(), 'prunax_oneshot_lm_task.pkl')


def make_task(
  d: int = 128, layers: int = 2, seq: int = 64, batch: int = 16, eval_windows: int = 256
):
  """The ``lm`` task of ``prunax compare`` with this benchmark's model size."""
  return tasks_lm.lm_task(
    batch_size=batch, d=d, layers=layers, heads=4, seq=seq, eval_windows=eval_windows
  )


def train(task, steps: int, seed: int = 0):
  """Dense training by the task's own loop; returns the model's params (``{'params': ...}``)."""
  dense = prunax.create_updater_from_config({'algorithm': 'no_prune', 'sparsity': 0.0})
  start = time.perf_counter()
  result = task.run(dense, seed, steps, lambda *a: None, steps)
  print(
    f'trained {steps} steps in {time.perf_counter() - start:.0f} s: held-out perplexity '
    f'{result.metric:.3f}',
    flush=True,
  )
  return jax.device_get(result.params)


def perplexity(task, params) -> float:
  """Held-out perplexity of ``params`` (the model's variables) on the task's eval windows."""
  x, y = task.eval_data
  return float(jax.jit(lambda p: task.metric_fn(task.apply_fn(p, x), y))(params))


def calibration_windows(task, num: int, seed: int) -> np.ndarray:
  """``num`` training windows (inputs only) drawn with ``seed``."""
  rows = np.random.default_rng(1000 + seed).integers(0, len(task.train_data[0]), num)
  return task.train_data[0][rows]


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    return next(
      line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name')
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or 'unknown'


def get_model(
  params_path: str = CACHE,
  steps: int = 1000,
  layers: int = 2,
  seq: int = 64,
  calib: int = 32,
  seed: int = 0,
) -> dict:
  """The trained LM for ``prunax oneshot --model benchmarks/oneshot_lm.py:get_model``.

  Trains it first (and caches the params in ``params_path``) when the cache is missing.
  """
  task = make_task(layers=layers, seq=seq)
  variables = load_or_train(task, params_path, steps)
  tokens = calibration_windows(task, calib, seed)
  return {
    'apply_fn': lambda p, t: task.apply_fn({'params': p}, t),
    'params': variables['params'],
    'batches': [tokens[i : i + 8] for i in range(0, len(tokens), 8)],
    'filter_fn': lambda name, leaf: name.startswith('block_'),
  }


def load_or_train(task, path: str, steps: int):
  """The trained variables cached in ``path``, or trained (and cached) when it is missing."""
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)
  variables = train(task, steps)
  with open(path, 'wb') as f:
    pickle.dump(variables, f)
  return variables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--d', type=int, default=128, help='model width')
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument(
    '--calib', type=int, default=32, help='calibration windows of --seq characters'
  )
  parser.add_argument('--eval', type=int, default=256, help='held-out windows of --seq characters')
  parser.add_argument(
    '--params',
    default=CACHE,
    help='trained params cache (reused when it exists)',
  )
  args = parser.parse_args()

  task = make_task(args.d, args.layers, args.seq, args.batch, args.eval)
  variables = load_or_train(task, args.params, args.steps)
  params = variables['params']

  def apply_fn(p, tokens):
    return task.apply_fn({'params': p}, tokens)

  def in_blocks(name, leaf):
    del leaf
    return name.startswith('block_')

  dense_ppl = perplexity(task, variables)
  train_ids, test_ids, vocab = tasks_lm.load_text()
  print(
    f'CPU: {cpu_model()}; jax {jax.__version__}; devices {jax.devices()}; load {os.getloadavg()}'
  )
  print(f'text: {len(train_ids)} train / {len(test_ids)} held-out characters, vocab {vocab}')
  print(
    f'unigram perplexity {task.unigram_perplexity:.3f}; dense transformer perplexity '
    f'{dense_ppl:.3f}'
  )

  patterns = [('50% unstructured', 'unstructured'), ('2:4', '2:4'), ('4:8', '4:8')]
  rows = []
  for label, stype in patterns:
    row = {}
    for method in ('magnitude', 'wanda', 'sparsegpt'):
      ppls, seconds = [], []
      for seed in range(args.seeds):
        calib = calibration_windows(task, args.calib, seed)
        batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]
        start = time.perf_counter()
        result = oneshot.prune(
          apply_fn,
          params,
          batches,
          method=method,
          sparsity=0.5,
          sparsity_type=stype,
          filter_fn=in_blocks,
        )
        seconds.append(time.perf_counter() - start)
        ppls.append(perplexity(task, {'params': result.params}))
        print(
          f'{label:>16} {method:>9} seed {seed}: ppl {ppls[-1]:.3f} '
          f'({seconds[-1]:.1f} s, mean layer error '
          f'{np.mean([r.error for r in result.table]):.4f})',
          flush=True,
        )
      row[method] = (float(np.mean(ppls)), float(np.std(ppls)))
    rows.append((label, row))

  print()
  print(
    f'| sparsity | magnitude | Wanda | SparseGPT |  (dense {dense_ppl:.3f}, '
    f'unigram {task.unigram_perplexity:.3f}; mean +- std over {args.seeds} calibration seeds)'
  )
  print('|---|---:|---:|---:|')
  for label, row in rows:
    cells = ' | '.join(
      f'{row[m][0]:.3f} +- {row[m][1]:.3f}' for m in ('magnitude', 'wanda', 'sparsegpt')
    )
    print(f'| {label} | {cells} |')


if __name__ == '__main__':
  main()

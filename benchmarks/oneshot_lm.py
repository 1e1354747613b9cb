"""One-shot pruning of a small character-level transformer LM: held-out perplexity table.

The text is the English documentation that ships with Python (``pydoc_data.topics``);
nothing is downloaded. A decoder-only transformer (flax linen) is trained on 90% of it;
then every kernel of its blocks (q, k, v, attention out, MLP in/out; not the embedding or
the output head, as in the papers) is pruned by ``prunax.oneshot.prune`` with magnitude,
Wanda and SparseGPT, at 50% unstructured, 2:4 and 4:8, from calibration windows drawn
from the training text with 3 seeds. Held-out perplexity is measured on the last 10%.

    python -m benchmarks.oneshot_lm                 # train (cached in --params), prune, table
    python -m benchmarks.oneshot_lm --steps 300 --seeds 1   # quick
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import pydoc_data.topics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import oneshot


def load_text() -> tuple[np.ndarray, np.ndarray, int]:
  topics = pydoc_data.topics.topics
  text = '\n\n'.join(topics[k] for k in sorted(topics))
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  split = int(0.9 * len(ids))
  return ids[:split], ids[split:], len(vocab)


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name='attn')(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.d, name='mlp_in')(h)
    return x + nn.Dense(self.d, name='mlp_out')(nn.gelu(h))


class CharLM(nn.Module):
  vocab: int
  d: int = 128
  layers: int = 4
  heads: int = 4
  seq: int = 128

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d)(tokens)
    x = x + self.param('pos', nn.initializers.normal(0.02), (self.seq, self.d))[: tokens.shape[1]]
    for i in range(self.layers):
      x = Block(self.d, self.heads, name=f'block_{i}')(x)
    return nn.Dense(self.vocab, name='head')(nn.LayerNorm()(x))


def windows(ids: np.ndarray, starts: np.ndarray, seq: int) -> np.ndarray:
  return np.stack([ids[s : s + seq + 1] for s in starts])


def train(model, train_ids, steps: int, batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, model.seq), jnp.int32))['params']
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, steps // 2), steps, 3e-4)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, w):
    def loss_fn(p):
      logits = model.apply({'params': p}, w[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  for i in range(steps):
    starts = rng.integers(0, len(train_ids) - model.seq - 1, batch)
    params, opt_state, loss = step(params, opt_state, windows(train_ids, starts, model.seq))
    if i % 200 == 0 or i == steps - 1:
      print(f'step {i:5d} loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)', flush=True)
  return params


def perplexity(model, params, ids: np.ndarray, num: int) -> float:
  seq = model.seq
  starts = np.arange(num) * seq
  starts = starts[starts + seq + 1 <= len(ids)]
  w = windows(ids, starts, seq)

  @jax.jit
  def nll(p, w):
    logits = model.apply({'params': p}, w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

  return float(np.exp(np.mean([float(nll(params, w[i : i + 32])) for i in range(0, len(w), 32)])))


def unigram_perplexity(train_ids, test_ids, vocab: int) -> float:
  counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(np.exp(-logp[test_ids].mean()))


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    return next(
      line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name')
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or 'unknown'


def get_model(
  params_path: str = '/tmp/prunax_oneshot_lm.pkl',
  steps: int = 1000,
  layers: int = 2,
  seq: int = 64,
  calib: int = 32,
  seed: int = 0,
) -> dict:
  """The trained LM for ``prunax oneshot --model benchmarks/oneshot_lm.py:get_model``.

  Trains it first (and caches the params in ``params_path``) when the cache is missing.
  """
  train_ids, _, vocab = load_text()
  model = CharLM(vocab, layers=layers, seq=seq)
  params = load_or_train(model, train_ids, params_path, steps, 16)
  starts = np.random.default_rng(1000 + seed).integers(0, len(train_ids) - seq - 1, calib)
  tokens = windows(train_ids, starts, seq)[:, :-1]
  return {
    'apply_fn': lambda p, t: model.apply({'params': p}, t),
    'params': params,
    'batches': [tokens[i : i + 8] for i in range(0, len(tokens), 8)],
    'filter_fn': lambda name, leaf: name.startswith('block_'),
  }


def load_or_train(model, train_ids, path: str, steps: int, batch: int):
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)
  params = train(model, train_ids, steps, batch)
  with open(path, 'wb') as f:
    pickle.dump(jax.device_get(params), f)
  return params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument(
    '--calib', type=int, default=32, help='calibration windows of --seq characters'
  )
  parser.add_argument('--eval', type=int, default=256, help='held-out windows of --seq characters')
  parser.add_argument(
    '--params',
    default='/tmp/prunax_oneshot_lm.pkl',
    help='trained params cache (reused when it exists)',
  )
  args = parser.parse_args()

  train_ids, test_ids, vocab = load_text()
  model = CharLM(vocab, layers=args.layers, seq=args.seq)
  params = load_or_train(model, train_ids, args.params, args.steps, args.batch)

  def apply_fn(p, tokens):
    return model.apply({'params': p}, tokens)

  def in_blocks(name, leaf):
    del leaf
    return name.startswith('block_')

  dense_ppl = perplexity(model, params, test_ids, args.eval)
  uni = unigram_perplexity(train_ids, test_ids, vocab)
  print(f'CPU: {cpu_model()}; jax {jax.__version__}; devices {jax.devices()}')
  print(f'text: {len(train_ids)} train / {len(test_ids)} held-out characters, vocab {vocab}')
  print(f'unigram perplexity {uni:.3f}; dense transformer perplexity {dense_ppl:.3f}')

  patterns = [('50% unstructured', 'unstructured'), ('2:4', '2:4'), ('4:8', '4:8')]
  rows = []
  for label, stype in patterns:
    row = {}
    for method in ('magnitude', 'wanda', 'sparsegpt'):
      ppls, seconds = [], []
      for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        starts = rng.integers(0, len(train_ids) - model.seq - 1, args.calib)
        calib = windows(train_ids, starts, model.seq)[:, :-1]
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
        ppls.append(perplexity(model, result.params, test_ids, args.eval))
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
    f'unigram {uni:.3f}; mean +- std over {args.seeds} calibration seeds)'
  )
  print('|---|---:|---:|---:|')
  for label, row in rows:
    cells = ' | '.join(
      f'{row[m][0]:.3f} +- {row[m][1]:.3f}' for m in ('magnitude', 'wanda', 'sparsegpt')
    )
    print(f'| {label} | {cells} |')


if __name__ == '__main__':
  main()

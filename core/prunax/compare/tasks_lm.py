"""A character-level language-model task: a small decoder-only transformer on Python's docs.

The text is the English documentation that ships with Python (``pydoc_data.topics``, the
help topics of ``help()``); nothing is downloaded. Characters are the tokens (103 of them on
Python 3.11). The split is deterministic: the topics are joined in sorted order, the first
90% of the characters train, the last 10% are held out. The metric is held-out perplexity,
``exp`` of the mean next-character cross-entropy, so lower is better
(``higher_is_better=False``).

:class:`CharLM` is also the model of ``benchmarks/oneshot_lm.py`` (one-shot pruning with
calibration data), so the two share one model and one text.

Dense baseline (:func:`lm_task` defaults, ``no_prune``, 400 steps, seeds 0-2, measured with
``prunax compare --config sweep_lm``): held-out perplexity 7.73 ± 0.10, against 28.19 for
the unigram model of the training characters on the same held-out windows
(``LanguageModelTask.unigram_perplexity``).
"""

from __future__ import annotations

import dataclasses
import pydoc_data.topics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax.compare.tasks import SupervisedTask
from prunax.compare.tasks import softmax_cross_entropy


def load_text(train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray, int]:
  """Python's help topics as character ids, split in order.

  Args:
    train_fraction: the share of the characters (from the start) used for training.

  Returns:
    ``(train_ids, held_out_ids, vocab_size)``; ids index the sorted set of characters.
  """
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f'train_fraction must lie in (0, 1), got {train_fraction!r}.')
  topics = pydoc_data.topics.topics
  text = '\n\n'.join(topics[k] for k in sorted(topics))
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  split = int(train_fraction * len(ids))
  return ids[:split], ids[split:], len(vocab)


def windows(ids: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """``ids[s : s + length]`` for every ``s`` in ``starts``, stacked."""
  return np.stack([ids[s : s + length] for s in starts])


def unigram_perplexity(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int) -> float:
  """Perplexity on ``test_ids`` of the character frequencies of ``train_ids`` (add-one)."""
  counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(np.exp(-logp[test_ids].mean()))


def perplexity(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``exp`` of the mean cross-entropy of integer ``targets`` under ``logits``."""
  return jnp.exp(softmax_cross_entropy(logits, targets))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention and a 4x GELU MLP."""

  d: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name='attn')(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.d, name='mlp_in')(h)
    return x + nn.Dense(self.d, name='mlp_out')(nn.gelu(h))


class CharLM(nn.Module):
  """A decoder-only transformer: token embedding plus a learned position embedding
  (``pos``), ``layers`` blocks named ``block_<i>`` (attention ``attn`` with
  ``query``/``key``/``value``/``out``, MLP ``mlp_in``/``mlp_out``), a final LayerNorm and a
  dense ``head`` to ``vocab`` logits. Inputs are ``[batch, length <= seq]`` ids."""

  vocab: int
  d: int = 64
  layers: int = 2
  heads: int = 4
  seq: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.d)(tokens)
    x = x + self.param('pos', nn.initializers.normal(0.02), (self.seq, self.d))[: tokens.shape[1]]
    for i in range(self.layers):
      x = Block(self.d, self.heads, name=f'block_{i}')(x)
    return nn.Dense(self.vocab, name='head')(nn.LayerNorm()(x))


@dataclasses.dataclass(eq=False)
class LanguageModelTask(SupervisedTask):
  """A :class:`SupervisedTask` whose metric is a perplexity (lower is better).

  Attributes:
    unigram_perplexity: the held-out perplexity of the training characters' frequencies,
      the baseline a trained model must beat.
  """

  metric_name: str = 'perplexity'
  higher_is_better: bool = False
  unigram_perplexity: float = float('nan')


def lm_task(
  batch_size: int = 32,
  learning_rate: float = 3e-3,
  d: int = 64,
  layers: int = 2,
  heads: int = 4,
  seq: int = 64,
  stride: int = 16,
  eval_windows: int = 128,
) -> LanguageModelTask:
  """Next-character prediction on Python's help topics with a small transformer and AdamW.

  Training examples are the windows of ``seq + 1`` characters starting every ``stride``
  characters of the training text (inputs the first ``seq``, targets the last ``seq``);
  the held-out perplexity is measured on ``eval_windows`` consecutive, non-overlapping
  windows from the start of the held-out text. The optimizer is AdamW (weight decay 0.01)
  after global-norm clipping at 1.

  Args:
    batch_size: windows per step.
    learning_rate: AdamW's learning rate.
    d: model width.
    layers: transformer blocks.
    heads: attention heads.
    seq: context length.
    stride: characters between the starts of two training windows.
    eval_windows: held-out windows of ``seq + 1`` characters.

  Returns:
    The task (named ``lm``, metric ``perplexity``).

  Raises:
    ValueError: a size is not positive, or the held-out text is shorter than asked.
  """
  for name, value in (
    ('batch_size', batch_size),
    ('d', d),
    ('layers', layers),
    ('heads', heads),
    ('seq', seq),
    ('stride', stride),
    ('eval_windows', eval_windows),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'lm_task: {name} must be an integer >= 1, got {value!r}.')
  if d % heads:
    raise ValueError(f'lm_task: d ({d}) must be a multiple of heads ({heads}).')
  train_ids, test_ids, vocab = load_text()
  if eval_windows * (seq + 1) > len(test_ids):
    raise ValueError(
      f'lm_task: {eval_windows} held-out windows of {seq + 1} characters need '
      f'{eval_windows * (seq + 1)} characters; the held-out text has {len(test_ids)}.'
    )
  train = windows(train_ids, np.arange(0, len(train_ids) - seq - 1, stride), seq + 1)
  held_out = windows(test_ids, np.arange(eval_windows) * (seq + 1), seq + 1)
  model = CharLM(vocab, d=d, layers=layers, heads=heads, seq=seq)
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01)
  )
  return LanguageModelTask(
    name='lm',
    init_fn=lambda key: model.init(key, train[:1, :-1]),
    apply_fn=model.apply,
    train_data=(train[:, :-1], train[:, 1:]),
    eval_data=(held_out[:, :-1], held_out[:, 1:]),
    optimizer=optimizer,
    batch_size=batch_size,
    metric_fn=perplexity,
    unigram_perplexity=unigram_perplexity(train_ids, held_out[:, 1:].ravel(), vocab),
  )

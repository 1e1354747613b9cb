"""An offline seqio task over text shipped with this package, for tiny example runs.

Importing this module registers the task ``prunax_tiny_corpus``: each line of
``data/tiny_corpus.txt`` becomes one example whose ``inputs`` are its first half of words and
whose ``targets`` are the rest, tokenized with ``seqio.ByteVocabulary`` (no model file, no
download). The ``validation`` split holds every fifth line, ``train`` all lines. Its metric,
``exact_match`` (the fraction of decoded targets equal to the reference), lets t5x's
``eval.py`` run on it.
"""

from __future__ import annotations

import pathlib

import seqio
import tensorflow as tf

TASK_NAME = 'prunax_tiny_corpus'
CORPUS_PATH = pathlib.Path(__file__).parent / 'data' / 'tiny_corpus.txt'


def _lines(split: str) -> list[str]:
  lines = [line.strip() for line in CORPUS_PATH.read_text().splitlines() if line.strip()]
  return lines if split == 'train' else lines[::5]


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one small file
  return tf.data.Dataset.from_tensor_slices({'text': _lines(split)})


@seqio.map_over_dataset
def _split_in_halves(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  words = tf.strings.split(example['text'])
  half = tf.size(words) // 2
  return {
    'inputs': tf.strings.reduce_join(words[:half], separator=' '),
    'targets': tf.strings.reduce_join(words[half:], separator=' '),
  }


def register() -> None:
  """Registers the task (again if needed, so re-imports in one process are harmless)."""
  vocabulary = seqio.ByteVocabulary()
  features = {
    name: seqio.Feature(vocabulary=vocabulary, add_eos=True) for name in ('inputs', 'targets')
  }
  seqio.TaskRegistry.remove(TASK_NAME)
  seqio.TaskRegistry.add(
    TASK_NAME,
    source=seqio.FunctionDataSource(
      _dataset_fn,
      splits=('train', 'validation'),
      num_input_examples={s: len(_lines(s)) for s in ('train', 'validation')},
    ),
    preprocessors=[
      _split_in_halves,
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=features,
    metric_fns=[exact_match],
  )


def exact_match(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """The fraction of ``predictions`` equal to their ``targets`` (a seqio metric)."""
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {'exact_match': hits / max(len(targets), 1)}


register()

"""A tiny offline image-classification data set, registered with Scenic's dataset registry.

Importing this module registers ``'prunax_synthetic_patterns'``: 8x8 grey-scale images of
four noisy patterns (horizontal stripes, vertical stripes, checkerboard, diagonal), made
with numpy from a fixed seed. Nothing is downloaded and no TensorFlow input pipeline runs,
so a Scenic run on it takes seconds on a CPU. It needs Scenic to be importable.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from scenic.dataset_lib import dataset_utils
from scenic.dataset_lib import datasets

DATASET_NAME = 'prunax_synthetic_patterns'
IMAGE_SIZE = 8
NUM_CLASSES = 4
NUM_TRAIN_EXAMPLES = 512
NUM_EVAL_EXAMPLES = 128


def _patterns() -> np.ndarray:
  """The four class patterns, values in {-1, 1}, shape (4, 8, 8)."""
  rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
  patterns = np.stack([rows % 2, cols % 2, (rows + cols) % 2, rows == cols])
  return patterns.astype(np.float32) * 2 - 1


def make_examples(num_examples: int, seed: int, noise: float = 0.5) -> dict[str, np.ndarray]:
  """``num_examples`` images (N, 8, 8, 1) float32 with int32 labels, deterministic in ``seed``."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples).astype(np.int32)
  images = _patterns()[labels] + noise * rng.standard_normal((num_examples, IMAGE_SIZE, IMAGE_SIZE))
  return {'inputs': images[..., None].astype(np.float32), 'label': labels}


def _batches(
  examples: dict[str, np.ndarray], batch_size: int, *, train: bool, seed: int | None
) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches: reshuffled each epoch when training, in order (last batch padded) else."""
  num = len(examples['label'])
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(num) if train else np.arange(num)
    stop = num - num % batch_size if train else num
    for start in range(0, stop, batch_size):
      idx = order[start : start + batch_size]
      yield {key: value[idx] for key, value in examples.items()}


@datasets.add_dataset(DATASET_NAME)
def get_dataset(
  *,
  batch_size: int,
  eval_batch_size: int,
  num_shards: int,
  dtype_str: str = 'float32',
  shuffle_seed: int | None = 0,
  rng=None,
  dataset_configs=None,
  dataset_service_address: str | None = None,
) -> dataset_utils.Dataset:
  """Scenic dataset builder (the signature Scenic's ``train_utils.get_dataset`` calls).

  ``dataset_configs`` may set ``num_train_examples``, ``num_eval_examples`` and ``noise``.
  """
  del rng
  if dataset_service_address:
    raise ValueError(
      f'{DATASET_NAME} is in memory and does not use the tf.data service '
      f'({dataset_service_address!r}).'
    )
  dataset_configs = dataset_configs or {}
  num_train = dataset_configs.get('num_train_examples', NUM_TRAIN_EXAMPLES)
  num_eval = dataset_configs.get('num_eval_examples', NUM_EVAL_EXAMPLES)
  noise = dataset_configs.get('noise', 0.5)
  dtype = np.dtype(dtype_str)

  def prepare(batches, train, size):
    pad = functools.partial(dataset_utils.maybe_pad_batch, train=train, batch_size=size)
    for batch in batches:
      batch = dict(batch, inputs=batch['inputs'].astype(dtype))
      yield dataset_utils.shard(pad(batch), n_devices=num_shards)

  train = make_examples(num_train, seed=0, noise=noise)
  evaluation = make_examples(num_eval, seed=1, noise=noise)
  meta_data = {
    'num_classes': NUM_CLASSES,
    'input_shape': (-1, IMAGE_SIZE, IMAGE_SIZE, 1),
    'num_train_examples': num_train,
    'num_eval_examples': num_eval,
    'input_dtype': getattr(jnp, dtype_str),
    'target_is_onehot': False,
  }
  return dataset_utils.Dataset(
    prepare(_batches(train, batch_size, train=True, seed=shuffle_seed), True, batch_size),
    prepare(_batches(evaluation, eval_batch_size, train=False, seed=None), False, eval_batch_size),
    None,
    meta_data,
  )

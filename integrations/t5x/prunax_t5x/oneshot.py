"""One-shot pruning of a t5x checkpoint (``prunax.oneshot``), then fine-tuning on its masks.

:func:`prune_checkpoint` reads the params (``target``) of a t5x checkpoint with Orbax,
prunes them layer by layer through the t5x model's own forward pass
(``model._compute_logits(params, batch)``, which every t5x ``BaseTransformerModel`` has) on
calibration batches, and writes

* ``checkpoint_<step>/state``: the checkpoint's tree with the pruned ``target`` (every
  other entry, e.g. the optimizer state, copied unchanged), in the same Orbax format;
* ``masks.npz``: the keep-masks by parameter name, read back by :func:`load_masks`;
* ``table.md``: layer, shape, sparsity and reconstruction error.

Fine-tuning with the masks fixed (gin)::

    prunax_t5x.pruned_optax:
      algorithm = 'fixed_masks'
      sparsity = 0.0
      extra = {'masks': @prunax_t5x.oneshot.load_masks()}
    prunax_t5x.oneshot.load_masks.path = '<out>/masks.npz'
    utils.RestoreCheckpointConfig:
      path = '<out>/checkpoint_<step>'
      mode = 'specific'
      # The pruner's optimizer state is new: restore the params only.
      assignment_map = ((r'state/.*', None),)
      fallback_to_scratch = True

Nothing here imports t5x; it was written against t5x's checkpoint layout and model API
(``target/...`` entries, ``_compute_logits``) but is tested with t5x only where t5x is
installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import gin
import jax
import numpy as np

import prunax
from prunax.sparsity_distributions import named_leaves

PyTree = Any
DENSE_KEY = '__dense__'


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp, ocp.PyTreeCheckpointer()


def read_checkpoint(checkpoint_dir: str) -> dict:
  """The whole tree of a t5x checkpoint directory (``.../checkpoint_<step>``) as numpy."""
  ocp, checkpointer = _checkpointer()
  path = os.path.join(checkpoint_dir, 'state')
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{checkpoint_dir!r} is not a t5x checkpoint directory: it has no "state" directory.'
    )
  metadata = checkpointer.metadata(path)
  tree = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', metadata)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)


def write_checkpoint(state: dict, out_dir: str, step: int) -> str:
  """Writes ``state`` as ``out_dir/checkpoint_<step>/state``; returns the checkpoint dir."""
  _, checkpointer = _checkpointer()
  checkpoint_dir = os.path.join(out_dir, f'checkpoint_{step}')
  checkpointer.save(os.path.join(checkpoint_dir, 'state'), state, force=True)
  return checkpoint_dir


def save_masks(path: str, masks: PyTree) -> None:
  """Writes keep-masks by parameter name; dense leaves (None) are listed by name."""
  named = named_leaves(masks, is_leaf=lambda x: x is None)
  arrays = {n: np.asarray(m, bool) for n, m in named if m is not None}
  dense = [n for n, m in named if m is None]
  arrays[DENSE_KEY] = np.frombuffer(json.dumps(dense).encode(), np.uint8)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


@gin.configurable(module='prunax_t5x.oneshot')
def load_masks(path: str = gin.REQUIRED) -> dict:
  """Keep-masks written by :func:`prune_checkpoint`, as nested dicts like the params
  (None for dense leaves), for ``FixedMaskSparse`` (``algorithm='fixed_masks'``)."""
  tree: dict = {}
  with np.load(path) as z:
    if DENSE_KEY not in z.files:
      raise ValueError(f'{path!r} was not written by prunax_t5x.oneshot (no {DENSE_KEY!r}).')
    entries = {n: z[n] for n in z.files if n != DENSE_KEY}
    entries.update({n: None for n in json.loads(z[DENSE_KEY].tobytes().decode())})
  for name, mask in entries.items():
    node = tree
    *parents, last = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = mask
  return tree


@gin.configurable(module='prunax_t5x.oneshot')
def configured_model(model=gin.REQUIRED):
  """The model a gin config builds: bind ``prunax_t5x.oneshot.configured_model.model =
  %MODEL`` next to a t5x gin file, then call ``configured_model()``."""
  return model


def prune_checkpoint(
  model,
  checkpoint_dir: str,
  batches: Iterable[Any],
  out_dir: str,
  *,
  method: str = 'sparsegpt',
  sparsity: float = 0.5,
  sparsity_type: str = 'unstructured',
  sequential: bool = True,
  filter_fn=None,
  **method_kwargs,
) -> prunax.oneshot.OneShotResult:
  """One-shot prunes the params of a t5x checkpoint through the t5x model.

  Args:
    model: a t5x model (``model._compute_logits(params, batch)`` is its forward pass), or
      any object with that method.
    checkpoint_dir: ``.../checkpoint_<step>`` written by t5x (Orbax).
    batches: calibration batches in the model's feature format (e.g.
      ``encoder_input_tokens``, ``decoder_input_tokens``, ``decoder_target_tokens``).
    out_dir: where the pruned checkpoint, ``masks.npz`` and ``table.md`` go.
    method, sparsity, sparsity_type, sequential, filter_fn, **method_kwargs: as
      :func:`prunax.oneshot.prune` (by default every matmul kernel is pruned; embeddings
      read by a gather are not kernels and stay dense).

  Returns:
    The :class:`prunax.oneshot.OneShotResult`.
  """
  state = read_checkpoint(checkpoint_dir)
  if 'target' not in state:
    raise ValueError(
      f'{checkpoint_dir!r} has no "target" (the params) in its tree; top-level keys: '
      f'{sorted(state)}.'
    )
  result = prunax.oneshot.prune(
    lambda params, batch: model._compute_logits(params, batch),
    state['target'],
    batches,
    method=method,
    sparsity=sparsity,
    sparsity_type=sparsity_type,
    sequential=sequential,
    filter_fn=filter_fn,
    **method_kwargs,
  )
  state = dict(state, target=jax.tree.map(np.asarray, result.params))
  step = int(np.asarray(state.get('state', {}).get('step', 0)))
  os.makedirs(out_dir, exist_ok=True)
  write_checkpoint(state, out_dir, step)
  save_masks(os.path.join(out_dir, 'masks.npz'), result.masks)
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write(prunax.oneshot.format_table(result.table) + '\n')
  return result

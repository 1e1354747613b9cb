"""Runs Scenic's own trainers with a prunax updater, without forking them.

A Scenic trainer builds its optimizer with ``scenic.train_lib.optimizers.get_optimizer``
(or ``scenic.train_lib.optax.make``), runs ``tx.update`` and ``optax.apply_updates`` in a
``jax.pmap``-ed train step, evaluates and checkpoints ``train_state.params``. prunax's
wrapped transformation alone leaves those params sparse, so while a sparse run trains,
:func:`pruning` makes both builders return ``updater.wrap_optax(tx)`` and adds the params'
sparsity to the train step's logs, which Scenic writes with its training summaries.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

import prunax
from prunax.sparsity_distributions import named_leaves
from prunax_scenic.config import SPARSITY_CONFIG_FIELD
from prunax_scenic.config import updater_from_config

_WRAPPED = '_prunax_scenic_wrapped'


def sparsity_logs(params: Any) -> dict[str, jax.Array]:
  """Traceable sparsity of params: ``'total_sparsity'`` and ``'sparsity/<name>'``.

  Counts the leaves with ndim >= 2, like :func:`prunax.summarize_sparsity` (which runs on
  the host); this version runs inside Scenic's pmapped train step.
  """
  logs = {}
  zeros, total = 0, 0
  for name, leaf in named_leaves(params):
    if jnp.ndim(leaf) >= 2:
      leaf_zeros = jnp.sum(leaf == 0)
      logs[f'sparsity/{name}'] = leaf_zeros / leaf.size
      zeros, total = zeros + leaf_zeros, total + leaf.size
  logs['total_sparsity'] = zeros / total if total else jnp.zeros(())
  return logs


def _with_sparsity_logs(train_step: Callable[..., Any]) -> Callable[..., Any]:
  """A Scenic train step whose training logs also hold the new params' sparsity."""

  @functools.wraps(train_step)
  def step(*args, **kwargs):
    outputs = train_step(*args, **kwargs)
    # Scenic's train steps return (new_train_state, metrics, training_logs).
    if not (
      isinstance(outputs, tuple)
      and len(outputs) == 3
      and isinstance(outputs[2], dict)
      and hasattr(outputs[0], 'params')
    ):
      logging.warning(
        'prunax: %s does not return (train_state, metrics, logs); no sparsity '
        'summaries are written.',
        train_step.__qualname__,
      )
      return outputs
    new_state, metrics, logs = outputs
    return new_state, metrics, {**logs, **sparsity_logs(new_state.params)}

  return step


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
  original = getattr(owner, name)
  setattr(owner, name, value)
  try:
    yield
  finally:
    setattr(owner, name, original)


@contextlib.contextmanager
def pruning(
  updater: prunax.BaseUpdater, trainer_module: types.ModuleType | None = None
) -> Iterator[None]:
  """Within this context, Scenic's optimizer builders return ``updater.wrap_optax(tx)``.

  Covers ``scenic.train_lib.optimizers.get_optimizer`` and ``scenic.train_lib.optax.make``
  as trainers call them (``optimizers.get_optimizer(...)``). If ``trainer_module`` has a
  ``train_step`` returning ``(train_state, metrics, logs)``, as Scenic's classification and
  transfer trainers do, the params' sparsity is added to ``logs``. Everything is restored
  on exit.

  Args:
    updater: the prunax updater, e.g. from :func:`prunax_scenic.updater_from_config`.
    trainer_module: the module whose ``train`` runs inside the context.

  Yields:
    None.
  """
  from scenic.train_lib import optax as scenic_optax
  from scenic.train_lib import optimizers

  get_optimizer, make = optimizers.get_optimizer, scenic_optax.make

  def pruned_get_optimizer(*args, **kwargs):
    return updater.wrap_optax(get_optimizer(*args, **kwargs))

  def pruned_make(*args, **kwargs):
    tx, schedule_fns = make(*args, **kwargs)
    return updater.wrap_optax(tx), schedule_fns

  with contextlib.ExitStack() as stack:
    stack.enter_context(_replaced(optimizers, 'get_optimizer', pruned_get_optimizer))
    stack.enter_context(_replaced(scenic_optax, 'make', pruned_make))
    if trainer_module is not None and callable(getattr(trainer_module, 'train_step', None)):
      stack.enter_context(
        _replaced(trainer_module, 'train_step', _with_sparsity_logs(trainer_module.train_step))
      )
    else:
      logging.warning(
        'prunax: %s has no train_step; no sparsity summaries are written.',
        getattr(trainer_module, '__name__', trainer_module),
      )
    yield


def sparse_trainer(train_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a Scenic trainer function so that it honours ``config.sparsity_config``.

  Without ``config.sparsity_config`` the trainer runs unchanged. With it, the trainer runs
  inside :func:`pruning` with the updater the config describes (an invalid config raises
  ``ValueError`` before training starts).

  Args:
    train_fn: a trainer with Scenic's signature ``train_fn(*, rng, config, model_cls,
      dataset, workdir, writer)``.

  Returns:
    The wrapped trainer (``train_fn`` itself if it is already wrapped).
  """
  if getattr(train_fn, _WRAPPED, False):
    return train_fn

  @functools.wraps(train_fn)
  def train(*, config, **kwargs):
    sparsity_config = config.get(SPARSITY_CONFIG_FIELD)
    if sparsity_config is None:
      return train_fn(config=config, **kwargs)
    updater = updater_from_config(sparsity_config)
    logging.info('prunax: %s trains with %r', train_fn.__module__, updater)
    with pruning(updater, trainer_module=sys.modules.get(train_fn.__module__)):
      return train_fn(config=config, **kwargs)

  setattr(train, _WRAPPED, True)
  return train


SPARSE_TRAINER_PREFIX = 'sparse_'


def register_sparse_trainer(trainer_name: str) -> str:
  """Registers ``'sparse_' + trainer_name``: that trainer wrapped with :func:`sparse_trainer`.

  Adds one entry to ``scenic.train_lib.trainers.ALL_TRAINERS`` and changes none: the
  trainer registered as ``trainer_name`` stays as it is for every other config. Calling it
  again (or with a name it returned) changes nothing.

  Args:
    trainer_name: a key of ``ALL_TRAINERS``, e.g. ``'classification_trainer'``.

  Returns:
    The name to set as ``config.trainer_name``, e.g. ``'sparse_classification_trainer'``.

  Raises:
    ValueError: if no trainer of that name is registered, listing the registered ones.
  """
  from scenic.train_lib import trainers

  if trainer_name in trainers.ALL_TRAINERS and getattr(
    trainers.ALL_TRAINERS[trainer_name], _WRAPPED, False
  ):
    return trainer_name
  if trainer_name not in trainers.ALL_TRAINERS:
    raise ValueError(
      f'No Scenic trainer named {trainer_name!r}; registered trainers are '
      f'{sorted(trainers.ALL_TRAINERS)}.'
    )
  sparse_name = SPARSE_TRAINER_PREFIX + trainer_name
  if sparse_name not in trainers.ALL_TRAINERS:
    trainers.ALL_TRAINERS[sparse_name] = sparse_trainer(trainers.ALL_TRAINERS[trainer_name])
  return sparse_name


def enable(config: Any) -> Any:
  """Opts one Scenic config in: its trainer becomes the sparse version of itself.

  Call it at the end of a config file's ``get_config()`` (``scenic.main`` imports nothing
  of the user's but the config file)::

    config.sparsity_config = ml_collections.ConfigDict({...})
    return prunax_scenic.enable(config)

  It sets ``config.trainer_name`` to :func:`register_sparse_trainer`'s name for it (e.g.
  ``'classification_trainer'`` -> ``'sparse_classification_trainer'``). Nothing happens on
  import and no registered trainer is replaced: other configs, and this one with
  ``--config.trainer_name=classification_trainer``, train dense.

  Args:
    config: the Scenic config (``ml_collections.ConfigDict``) with ``trainer_name`` and
      ``sparsity_config``.

  Returns:
    ``config``, changed in place.

  Raises:
    ValueError: if the config has no ``sparsity_config`` or names no registered trainer.
  """
  if config.get(SPARSITY_CONFIG_FIELD) is None:
    raise ValueError(
      f'prunax_scenic.enable(config) needs config.{SPARSITY_CONFIG_FIELD} '
      '(a ConfigDict with the keys of prunax.create_updater_from_config); '
      'set it before calling enable.'
    )
  updater_from_config(config.get(SPARSITY_CONFIG_FIELD))  # A bad config fails here, early.
  config.trainer_name = register_sparse_trainer(config.get('trainer_name'))
  return config

"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding.

Frankle & Carbin (2019), with late rewinding (Frankle et al., 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis"): train; prune ``prune_fraction`` of the
remaining weights by magnitude (globally, or per leaf); reset the surviving weights to
their values after ``rewind_step`` steps of the first training (0: the initialisation);
retrain; repeat. After ``r`` pruning rounds the pruned leaves have sparsity
``1 - (1 - prune_fraction) ** r`` (exactly, up to rounding to whole weights).

The training itself is the user's function, called as ``train_fn(params, updater,
save_step)``: it trains ``params`` with ``updater.wrap_optax(optimizer)`` (round 0 gets
:class:`prunax.NoPruning`, later rounds :class:`prunax.pruning_at_init.FixedMaskSparse`
holding the ticket's masks) and returns ``(trained_params, metrics, saved_params)``, where
``saved_params`` are the params after ``save_step`` steps when ``save_step`` is not None
(only asked of round 0, for late rewinding), else anything (ignored). Later rounds get
``save_step=None`` and are not told ``rewind_step``: their weights are rewound, but the
training they run is whatever ``train_fn`` does from its start. Frankle et al. (2020)
resume training at the rewind step (the learning-rate schedule continues from there, for
the remaining steps); to do the same, have ``train_fn`` start its schedule at
``rewind_step`` when ``save_step is None`` (it knows ``rewind_step``: it is your
argument). IMP is
dense-to-sparse training (Sparseland handbook, 3.9), so it is a driver around training
rather than an updater.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from prunax import _checks
from prunax.algorithms.pruners import NoPruning
from prunax.base_updater import BaseUpdater
from prunax.base_updater import map_masked
from prunax.pruning_at_init import FixedMaskSparse
from prunax.pruning_at_init import masks_from_scores
from prunax.summary import summarize_sparsity

PyTree = Any
TrainFn = Callable[[PyTree, BaseUpdater, 'int | None'], tuple[PyTree, Any, Any]]


@dataclasses.dataclass
class LotteryRound:
  """One training of IMP.

  Attributes:
    round: 0 for the dense training, ``r`` after ``r`` pruning rounds.
    masks: the boolean keep-masks the round trained with (None in round 0).
    start_params: the params the round started from (rewound and masked).
    trained_params: the params the round ended with.
    metrics: what ``train_fn`` returned.
    sparsity: ``prunax.summarize_sparsity`` of ``trained_params``.
  """

  round: int
  masks: PyTree
  start_params: PyTree
  trained_params: PyTree
  metrics: Any
  sparsity: dict[str, float]


def iterative_magnitude_pruning(
  train_fn: TrainFn,
  params: PyTree,
  rounds: int,
  prune_fraction: float = 0.2,
  rewind_step: int = 0,
  sparsity_distribution_fn: Any = None,
  *,
  layer_axes: Any = None,
) -> list[LotteryRound]:
  """Runs IMP with rewinding: ``rounds`` pruning rounds, so ``rounds + 1`` trainings.

  Args:
    train_fn: the user's training, ``train_fn(params, updater, save_step) ->
      (trained_params, metrics, saved_params)`` (see the module docstring).
    params: the initial weights.
    rounds: number of pruning rounds (>= 1).
    prune_fraction: fraction of the remaining weights pruned per round, in (0, 1).
    rewind_step: step of the first training whose weights the survivors are reset to
      (0: the initial weights).
    sparsity_distribution_fn: None for global magnitude pruning (one threshold over the
      pruned leaves), else a per-leaf distribution (``'uniform'``, ...); it also selects
      the pruned leaves (default: ndim >= 2).
    layer_axes: ``{parameter name or regex: axis}`` of stacked (scanned) parameters, each
      of whose layers a per-leaf distribution prunes on its own.

  Returns:
    The :class:`LotteryRound` records, round 0 (dense) first.
  """
  rounds = _checks.integer(rounds, 'rounds', 1)
  prune_fraction = _checks.number(
    prune_fraction, 'prune_fraction', 0.0, 1.0, low_open=True, high_open=True
  )
  rewind_step = _checks.integer(rewind_step, 'rewind_step', 0)

  trained, metrics, saved = train_fn(params, NoPruning(), rewind_step or None)
  rewind_to = params if rewind_step == 0 else saved
  if rewind_to is None:
    raise ValueError(
      f'train_fn returned no saved params for rewind_step={rewind_step}; it '
      'must return the params after save_step steps as its third output.'
    )
  history = [LotteryRound(0, None, params, trained, metrics, summarize_sparsity(trained))]
  masks = None
  for r in range(1, rounds + 1):
    scores = jax.tree.map(jnp.abs, trained)
    if masks is not None:  # Pruned weights stay pruned.
      scores = map_masked(lambda m, s: jnp.where(m, s, -1.0), masks, scores)
    sparsity = 1.0 - (1.0 - prune_fraction) ** r
    masks = masks_from_scores(
      trained, scores, sparsity, sparsity_distribution_fn, layer_axes=layer_axes
    )
    start = map_masked(lambda m, w: jnp.where(m, w, 0).astype(w.dtype), masks, rewind_to)
    trained, metrics, _ = train_fn(start, FixedMaskSparse(masks=masks), None)
    history.append(LotteryRound(r, masks, start, trained, metrics, summarize_sparsity(trained)))
  return history

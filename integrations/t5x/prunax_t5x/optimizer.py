"""The gin factory of a pruned optax transformation (no t5x needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gin
import optax

import prunax


@gin.configurable(module='prunax_t5x')
def pruned_optax(
  optimizer: optax.GradientTransformation,
  algorithm: str,
  sparsity: float,
  dist_type: str = 'erk',
  sparsity_type: str = 'unstructured',
  update_freq: int | None = None,
  update_start_step: int | None = None,
  update_end_step: int | None = None,
  drop_fraction: float | None = None,
  drop_fraction_fn: str | None = None,
  custom_sparsity_map: Mapping[str, float] | None = None,
  seed: int = 0,
  packed_masks: bool = True,
  power: float | None = None,
  layer_axes: Mapping[str, int] | None = None,
  extra: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` wrapped by a prunax algorithm, for ``PrunedOptaxWrapper.optax_optimizer``.

  The settings are those of :func:`prunax.create_updater_from_config`; a setting left at
  None keeps that function's default. In gin::

    prunax_t5x.pruned_optax:
      optimizer = @optax.adam()
      algorithm = 'magnitude'
      sparsity = 0.8
      update_freq = 1000
      update_start_step = 10000
      update_end_step = 75000

  Args:
    optimizer: the inner optax transformation (it sees masked gradients).
    algorithm: a name from :func:`prunax.all_algorithm_names`, e.g. 'magnitude', 'rigl'.
    sparsity: target sparsity in [0, 1).
    dist_type: 'erk' or 'uniform' distribution of the sparsity over layers.
    sparsity_type: 'unstructured', 'nm_N,M', 'block_B1,B2' or 'channel_AXIS'.
    update_freq: steps between mask updates.
    update_start_step: first mask-update step.
    update_end_step: last mask-update step.
    drop_fraction: fraction of connections dropped per update (drop-and-grow algorithms
      only: set, rigl, snfs, mest, granet, nm_set, nm_rigl).
    drop_fraction_fn: 'cosine' (decays to 0 at ``update_end_step``, which it needs) or
      'constant'; None: 'cosine' with an ``update_end_step``, else constant with a warning
      (drop-and-grow algorithms only).
    custom_sparsity_map: sparsities per parameter name, e.g. {'params/token_embedder/embedding':
      0.0}.
    seed: seed of the pruner's random key.
    packed_masks: store masks as bits packed along the last axis.
    power: exponent of the polynomial (gradual pruning) schedule; 3 when None.
    layer_axes: ``{parameter name or regex: axis}`` of stacked (scanned) layers, so that
      each layer of a stacked kernel is pruned as its own layer, e.g.
      ``{'params/decoder/layers/mlp/wi/kernel': 1}``; for a flax model
      ``prunax.layers.layer_axes_from_flax(params, params_axes=...)`` reads them from
      t5x/flaxformer's ``params_axes`` (logical axis ``'layers'``).
    extra: further constructor arguments of the algorithm.

  Returns:
    The pruned transformation; its state is a ``prunax.SparseState``.

  Raises:
    ValueError: an unknown algorithm or sparsity type, or an invalid value.
  """
  config = {
    'algorithm': algorithm,
    'sparsity': sparsity,
    'dist_type': dist_type,
    'sparsity_type': sparsity_type,
    'update_freq': update_freq,
    'update_start_step': update_start_step,
    'update_end_step': update_end_step,
    'drop_fraction': drop_fraction,
    'drop_fraction_fn': drop_fraction_fn,
    'custom_sparsity_map': custom_sparsity_map,
    'seed': seed,
    'packed_masks': packed_masks,
    'power': power,
    'extra': {**(extra or {}), 'layer_axes': dict(layer_axes)} if layer_axes else extra,
  }
  updater = prunax.create_updater_from_config(
    {key: value for key, value in config.items() if value is not None}
  )
  return updater.wrap_optax(optimizer)

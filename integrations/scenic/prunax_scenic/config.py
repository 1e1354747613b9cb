"""From a Scenic ``config.sparsity_config`` to a prunax updater (no Scenic import needed).

``config.sparsity_config`` holds the keys of :func:`prunax.create_updater_from_config`
(``algorithm``, ``sparsity``, ``dist_type``, ``sparsity_type``, ``update_freq``,
``update_start_step``, ``update_end_step``, ``drop_fraction``, ``custom_sparsity_map``,
``filter_fn``, ``seed``, ``packed_masks``, ...). Scenic's parameter names have no
``'params/'`` prefix: the first ResNet convolution is ``'stem_conv/kernel'``.

Two additions for Scenic configs:

- A ``ConfigDict`` refuses field names with dots, so ``custom_sparsity_map`` may also be a
  sequence of ``(name_or_regex, sparsity)`` pairs, e.g. ``(('.*/pos_embedding', 0.0),)``.
- One config serves every algorithm, as in the JaxPruner paper's Scenic configs, so that
  ``--config.sparsity_config.algorithm=...`` switches algorithms on the command line (which
  can override keys but not add them): ``drop_fraction`` and ``drop_fraction_fn`` are
  ignored by algorithms that do not drop and grow connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import prunax

SPARSITY_CONFIG_FIELD = 'sparsity_config'
_DROP_AND_GROW_KEYS = ('drop_fraction', 'drop_fraction_fn')


def _as_dict(sparsity_config: Any) -> dict[str, Any]:
  if hasattr(sparsity_config, 'to_dict'):  # ml_collections.ConfigDict / FrozenConfigDict
    return dict(sparsity_config.to_dict())
  if isinstance(sparsity_config, Mapping):
    return dict(sparsity_config)
  raise ValueError(
    f'config.{SPARSITY_CONFIG_FIELD} must be an ml_collections.ConfigDict or a '
    f'dict, got {type(sparsity_config).__name__}: {sparsity_config!r}.'
  )


def _custom_map(value: Any) -> dict[str, float]:
  """A custom sparsity map from a mapping or a sequence of (name or regex, sparsity) pairs."""
  if isinstance(value, Mapping):
    return dict(value)
  if isinstance(value, Sequence) and not isinstance(value, str):
    pairs = list(value)
    if all(
      isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and isinstance(p[0], str)
      for p in pairs
    ):
      return {name: sparsity for name, sparsity in pairs}
  raise ValueError(
    f'custom_sparsity_map must be a mapping {{name or regex: sparsity}} or a '
    f'sequence of (name or regex, sparsity) pairs, got {value!r}.'
  )


def updater_from_config(sparsity_config: Any) -> prunax.BaseUpdater:
  """Builds the prunax updater described by a Scenic ``config.sparsity_config``.

  Args:
    sparsity_config: an ``ml_collections.ConfigDict`` or dict with the keys of
      :func:`prunax.create_updater_from_config`; ``custom_sparsity_map`` may also be a
      sequence of ``(name or regex, sparsity)`` pairs; ``drop_fraction`` is ignored by
      algorithms that do not drop and grow connections.

  Returns:
    The updater (a frozen dataclass); ``updater.wrap_optax(tx)`` prunes ``tx``'s params.

  Raises:
    ValueError: the config is not a mapping, has unknown keys or names, or bad values.
  """
  cfg = _as_dict(sparsity_config)
  if 'algorithm' in cfg:
    algorithm = prunax.get_algorithm(cfg['algorithm'])  # ValueError naming the valid names.
    for key in _DROP_AND_GROW_KEYS:
      if key in cfg and not hasattr(algorithm, key):
        del cfg[key]
  if cfg.get('custom_sparsity_map') is not None:
    cfg['custom_sparsity_map'] = _custom_map(cfg['custom_sparsity_map'])
  if 'filter_fn' in cfg and cfg['filter_fn'] is not None and not callable(cfg['filter_fn']):
    raise ValueError(
      f'filter_fn must be a callable fn(name, param) -> bool, got {cfg["filter_fn"]!r}.'
    )
  return prunax.create_updater_from_config(cfg)

"""t5x's ``OptaxWrapper`` for pruned transformations (imports t5x)."""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import serialization
from flax import traverse_util
from flax.core import frozen_dict
from t5x import optimizers

import prunax
from prunax_t5x.partitioning import sparse_state_logical_axes


@gin.configurable(module='prunax_t5x')
class PrunedOptaxWrapper(optimizers.OptaxWrapper):
  """``t5x.optimizers.OptaxWrapper`` whose optax state may hold ``prunax.SparseState``.

  Training is t5x's own. Three of ``OptaxWrapper``'s methods are extended; nothing in t5x
  is modified:

  - :meth:`derive_logical_axes`, the hook t5x's partitioner calls for every optimizer:
    ``SparseState`` nodes get the params' axes for their masks and dense weights, and every
    other optax state keeps t5x's own rules.
  - :meth:`create` (t5x's initial train state): the initial params are masked with the
    pruner's initial masks, so that ``checkpoint_0`` and the first forward pass of sparse
    training (static, SET, RigL) use sparse params, as every later step does.
  - :meth:`restore_state` (every resume): t5x hands back integer state (its step, the
    pruner's count and RNG key) as float32; each state leaf is cast back to the dtype of the
    freshly initialised state.

  In gin::

    OPTIMIZER = @prunax_t5x.PrunedOptaxWrapper()
    prunax_t5x.PrunedOptaxWrapper.optax_optimizer = @prunax_t5x.pruned_optax()
  """

  def create(self, target: Any) -> optimizers.Optimizer:
    """t5x's initial optimizer, with the params under the pruner's initial masks."""
    state = self.init_state(target)
    try:
      sparse_state = prunax.get_sparse_state(state.param_states)
    except ValueError:  # Not a pruned transformation: t5x's own behaviour.
      return optimizers.Optimizer(self, state, target)
    masks = prunax.unpack_masks(sparse_state.masks, target)
    target = jax.tree.map(
      lambda m, p: p if m is None else jnp.where(m, p, 0).astype(p.dtype),
      masks,
      target,
      is_leaf=lambda x: x is None,
    )
    return optimizers.Optimizer(self, state, target)

  def init_state(self, params: Any) -> Any:
    """``OptaxWrapper.init_state``; records the state's ``None`` fields for :meth:`state_dict`."""
    state = super().init_state(params)
    flat = traverse_util.flatten_dict(serialization.to_state_dict(state), sep='/')
    self._none_paths = frozenset(key for key, value in flat.items() if value is None)
    return state

  def state_dict(self, target: Any, state: Any) -> dict[str, Any]:
    """``OptaxWrapper.state_dict`` without the state's ``None`` fields.

    A ``None`` field (an absent algorithm state, the mask of a
    leaf that is not pruned) would be saved as an empty entry that t5x then fails to read
    on resume (``NOT_FOUND ... .zarray``); :meth:`restore_state` puts them back. Only the
    fields that are ``None`` in the initialised state are left out: t5x also calls this on
    trees of partitioning axes, where ``None`` means "replicated".
    """
    state_dict = super().state_dict(target, state)
    none_paths = getattr(self, '_none_paths', frozenset())
    if none_paths:
      flat = traverse_util.flatten_dict(state_dict['state'], sep='/')
      state_dict['state'] = traverse_util.unflatten_dict(
        {key: value for key, value in flat.items() if key not in none_paths}, sep='/'
      )
    return state_dict

  def restore_state(self, opt_target: Any, opt_state: Any, state_dict: Any) -> tuple[Any, Any]:
    """``OptaxWrapper.restore_state``, with every state leaf in its initialised dtype.

    Also puts back the ``None`` entries :meth:`state_dict` leaves out.
    """
    flat = dict(traverse_util.flatten_dict(state_dict['state'], sep='/'))
    flat.update({key: None for key in getattr(self, '_none_paths', ()) if key not in flat})
    state_dict = {**state_dict, 'state': traverse_util.unflatten_dict(flat, sep='/')}
    target, state = super().restore_state(opt_target, opt_state, state_dict)

    def like(reference, restored):
      dtype = getattr(reference, 'dtype', None)
      if dtype is None or getattr(restored, 'dtype', dtype) == dtype:
        return restored
      if isinstance(restored, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(restored.shape, dtype, sharding=restored.sharding)
      return restored.astype(dtype)

    return target, jax.tree.map(like, opt_state, state)

  def derive_logical_axes(
    self, optimizer: optimizers.Optimizer, param_logical_axes: Any
  ) -> optimizers.Optimizer:
    """Like ``OptaxWrapper.derive_logical_axes``, also for pruned optimizer states."""
    axes = jax.tree.map(lambda _: None, optimizer.state_dict())
    axes['target'] = param_logical_axes
    state_axes = sparse_state_logical_axes(
      optimizer.state.param_states,
      param_logical_axes,
      optimizers.OptaxStatePartitionRules.derive_optax_logical_axes,
    )
    axes['state']['param_states'] = serialization.to_state_dict(state_axes)
    return optimizer.restore_state(frozen_dict.unfreeze(axes))

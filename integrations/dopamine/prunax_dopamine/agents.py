"""Pruned Dopamine JAX agents: one mixin, applied to DQN, Rainbow, Quantile and IQN.

Every Dopamine JAX agent builds its optimizer in ``_build_networks_and_optimizer`` (through
``dqn_agent.create_optimizer``) and hands it to a jitted ``train`` function as a static
argument, which calls ``optimizer.update(grad, state, params=online_params)`` and
``optax.apply_updates``. :class:`PrunedAgentMixin` wraps that optimizer once with
``pruner.wrap_optax``, so Dopamine's own ``train`` leaves the online params sparse after
every step, the target network copies them, action selection uses them, and the pruner's
state (masks, step counter, dense weights of STE) is part of ``optimizer_state``, which
Dopamine checkpoints. The pruning schedule counts optimizer updates (one every
``update_period`` agent steps once ``min_replay_history`` transitions are stored).
"""

from __future__ import annotations

from typing import Any

import gin
import jax.numpy as jnp
import numpy as np
from absl import logging

import prunax
from prunax_dopamine import compat

compat.require()  # Names a missing compat.apply() before Dopamine fails to import.

from dopamine.jax.agents.dqn import dqn_agent  # noqa: E402
from dopamine.jax.agents.implicit_quantile import implicit_quantile_agent  # noqa: E402
from dopamine.jax.agents.quantile import quantile_agent  # noqa: E402
from dopamine.jax.agents.rainbow import rainbow_agent  # noqa: E402
from dopamine.metrics import statistics_instance  # noqa: E402

# Bundle entry holding the agent's action-selection RNG key (``_rng``).
RNG_KEY = 'prunax_agent_rng'


@gin.configurable(module='prunax_dopamine')
def pruner(
  algorithm: str,
  sparsity: float | None = None,
  dist_type: str | None = None,
  sparsity_type: str | None = None,
  update_freq: int | None = None,
  update_start_step: int | None = None,
  update_end_step: int | None = None,
  drop_fraction: float | None = None,
  seed: int | None = None,
  **config: Any,
) -> prunax.BaseUpdater:
  """A prunax updater from gin bindings (``prunax.create_updater_from_config``).

  Bind it as ``PrunedDQNAgent.pruner = @prunax_dopamine.pruner()``. Arguments left
  unbound take ``create_updater_from_config``'s defaults; steps count optimizer updates.

  Args:
    algorithm: one of ``prunax.all_algorithm_names()``, e.g. 'magnitude', 'rigl'.
    sparsity: target sparsity in [0, 1).
    dist_type: 'uniform' or 'erk'.
    sparsity_type: 'unstructured', 'nm_N,M', 'block_B1,B2' or 'channel_AXIS'.
    update_freq: optimizer updates between mask updates.
    update_start_step: first mask update.
    update_end_step: last mask update (gradual pruning reaches the target there).
    drop_fraction: fraction of active weights replaced per update (SET, RigL).
    seed: seed of the pruner's RNG (random masks and scores).
    **config: further ``create_updater_from_config`` keys (power, drop_fraction_fn,
      custom_sparsity_map, packed_masks, ...).

  Returns:
    The updater (a frozen, hashable dataclass).

  Raises:
    ValueError: unknown algorithm or keys, or invalid values.
  """
  named = dict(
    algorithm=algorithm,
    sparsity=sparsity,
    dist_type=dist_type,
    sparsity_type=sparsity_type,
    update_freq=update_freq,
    update_start_step=update_start_step,
    update_end_step=update_end_step,
    drop_fraction=drop_fraction,
    seed=seed,
  )
  named = {key: value for key, value in named.items() if value is not None}
  return prunax.create_updater_from_config({**named, **config})


class PrunedAgentMixin:
  """Prunes the online network of a Dopamine JAX agent (a ``JaxDQNAgent`` subclass).

  Put it first among the bases: ``class MyAgent(PrunedAgentMixin, JaxDQNAgent)``.

  Attributes:
    pruner: the prunax updater.
  """

  def __init__(self, *args, pruner: prunax.BaseUpdater | None = None, **kwargs):
    """Stores the pruner, then runs the agent's own constructor.

    Args:
      *args: the agent's positional arguments (``num_actions``...).
      pruner: a prunax updater, e.g. ``prunax.RigL(sparsity=0.9)`` or, from gin,
        ``@prunax_dopamine.pruner()``.
      **kwargs: the agent's other arguments.

    Raises:
      ValueError: if ``pruner`` is not a prunax updater.
    """
    if not isinstance(pruner, prunax.BaseUpdater):
      raise ValueError(
        f'{type(self).__name__} needs a prunax updater as `pruner`, got {pruner!r}; bind '
        f'e.g. `{type(self).__name__}.pruner = @prunax_dopamine.pruner()` and '
        "`prunax_dopamine.pruner.algorithm = 'magnitude'` in gin."
      )
    self.pruner = pruner
    super().__init__(*args, **kwargs)

  def _build_networks_and_optimizer(self):
    super()._build_networks_and_optimizer()
    # Wrapped once: Dopamine's jitted train takes the optimizer as a static (hashed) argument.
    self.optimizer = self.pruner.wrap_optax(self.optimizer)
    self.optimizer_state = self.optimizer.init(self.online_params)
    # Sparse-training masks exist from init: act and bootstrap with sparse params at once.
    self.online_params = self.pruner.pre_forward_update(self.online_params, self.optimizer_state)
    self.target_network_params = self.online_params

  def sparsity_summary(self) -> dict[str, float]:
    """``prunax.summarize_sparsity`` of the online params (total and per layer)."""
    return prunax.summarize_sparsity(self.online_params)

  def _write_sparsity_statistics(self, iteration: int) -> None:
    summary = self.sparsity_summary()
    target = prunax.summarize_sparsity(self.target_network_params, only_total=True)
    stats = {
      'Sparsity/Total': summary['total_sparsity'],
      'Sparsity/TargetTotal': target['total_sparsity'],
    }
    stats.update(
      {
        'Sparsity/' + key.removeprefix('sparsity/'): value
        for key, value in summary.items()
        if key.startswith('sparsity/')
      }
    )
    logging.info('Iteration %d sparsity: %s', iteration, stats)
    if hasattr(self, 'collector_dispatcher'):
      self.collector_dispatcher.write(
        [
          statistics_instance.StatisticsInstance(name, value, iteration)
          for name, value in stats.items()
        ]
      )

  def bundle_and_checkpoint(self, checkpoint_dir, iteration_number):
    """Reports sparsity to Dopamine's collectors, then bundles as the agent does.

    Dopamine's runners call this once at the end of every iteration, before flushing
    their collectors, so the sparsity statistics land with the iteration's returns.
    """
    self._write_sparsity_statistics(iteration_number)
    bundle = super().bundle_and_checkpoint(checkpoint_dir, iteration_number)
    if bundle is not None and hasattr(self, '_rng'):
      bundle[RNG_KEY] = np.asarray(self._rng)
    return bundle

  def unbundle(self, checkpoint_dir, iteration_number, bundle_dictionary):
    """Restores as the agent does; the pruner's state comes back with ``optimizer_state``.

    Also restores the agent's action-selection RNG key saved by
    :meth:`bundle_and_checkpoint` (Dopamine itself re-seeds it on every launch, so a
    resumed run would explore differently from an uninterrupted one). Checkpoints without
    it (written by Dopamine's own agents) keep the re-seeded key.

    Raises:
      ValueError: if the checkpoint holds no pruner state (written by a dense agent).
    """
    restored = super().unbundle(checkpoint_dir, iteration_number, bundle_dictionary)
    if restored and bundle_dictionary is not None:
      try:
        prunax.get_sparse_state(self.optimizer_state)
      except ValueError as e:
        raise ValueError(
          f'The checkpoint of iteration {iteration_number} in {checkpoint_dir!r} has no '
          f'prunax pruner state; it was not written by a pruned agent. Start from a new '
          'base_dir, or resume it with the dense agent.'
        ) from e
      if RNG_KEY in bundle_dictionary and hasattr(self, '_rng'):
        self._rng = jnp.asarray(bundle_dictionary[RNG_KEY], dtype=self._rng.dtype)
    return restored


@gin.configurable(module='prunax_dopamine')
class PrunedDQNAgent(PrunedAgentMixin, dqn_agent.JaxDQNAgent):
  """Dopamine's ``JaxDQNAgent`` with a pruned online network."""


@gin.configurable(module='prunax_dopamine')
class PrunedRainbowAgent(PrunedAgentMixin, rainbow_agent.JaxRainbowAgent):
  """Dopamine's ``JaxRainbowAgent`` with a pruned online network."""


@gin.configurable(module='prunax_dopamine')
class PrunedQuantileAgent(PrunedAgentMixin, quantile_agent.JaxQuantileAgent):
  """Dopamine's ``JaxQuantileAgent`` with a pruned online network."""


@gin.configurable(module='prunax_dopamine')
class PrunedImplicitQuantileAgent(
  PrunedAgentMixin, implicit_quantile_agent.JaxImplicitQuantileAgent
):
  """Dopamine's ``JaxImplicitQuantileAgent`` with a pruned online network."""

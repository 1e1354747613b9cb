"""Pruned FedJAX optimizers: server-side pruning and optional client-side sparsity.

FedJAX's FedAvg and FedProx send the mean client delta to the server optimizer as a
pseudo-gradient and broadcast the params it returns. A prunax-wrapped optax transformation
leaves those params exactly as sparse as the pruner's schedule says, so the server model is
pruned on the scheduled rounds before being broadcast; STE-style algorithms keep the dense
weights in the server's optimizer state and broadcast the sparse ones. Schedule steps are
server rounds.
"""

from typing import Any
from typing import NamedTuple

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunax
from prunax_fedjax._compat import restore_jax_tree_map

PyTree = Any

# FedJAX 0.0.17 algorithms that take a server optimizer and broadcast the params it returns.
SERVER_ALGORITHMS = ('agnostic_fed_avg', 'fed_avg', 'fed_prox', 'hyp_cluster')
# FedJAX algorithms that throw away the params returned by the optimizer given to them.
_DISCARD_PARAMS = ('mime', 'mime_lite')


def _check_pruner(pruner: Any) -> None:
  if not isinstance(pruner, prunax.BaseUpdater):
    raise TypeError(
      f'pruner must be a prunax algorithm (e.g. prunax.MagnitudePruning(...) or '
      f'prunax.create_updater_from_config(...)), got {pruner!r}.'
    )


def server_optimizer(
  pruner: prunax.BaseUpdater, inner: optax.GradientTransformation, *, algorithm: str = 'fed_avg'
) -> fedjax.optimizers.Optimizer:
  """A FedJAX server optimizer that runs ``inner`` and prunes the server model.

  Pass it to ``fed_avg.federated_averaging`` or ``fed_prox.fed_prox`` as
  ``server_optimizer``. Its state is the prunax :class:`~prunax.SparseState` (masks, round
  counter, dense weights for STE), so it is saved with the server state. Calls
  :func:`prunax_fedjax.restore_jax_tree_map` (FedJAX's rounds call ``jax.tree_map``).

  Args:
    pruner: a prunax algorithm; its schedule counts server rounds.
    inner: the server's optax transformation (e.g. ``optax.adam(1e-3)``).
    algorithm: the name of the ``fedjax.algorithms`` module the optimizer is given to, one
      of :data:`SERVER_ALGORITHMS`.

  Returns:
    A ``fedjax.optimizers.Optimizer``. Its ``init`` validates the pruner against the
    params (custom sparsity maps, sparsity types).

  Raises:
    TypeError: ``pruner`` is not a prunax algorithm.
    ValueError: ``algorithm`` is ``'mime'`` or ``'mime_lite'``, which discard the params the
      optimizer returns (so the server model could never be pruned), or an unknown name.
  """
  _check_pruner(pruner)
  if algorithm in _DISCARD_PARAMS:
    raise ValueError(
      f'fedjax.algorithms.{algorithm} uses its base optimizer only for the optimizer state '
      '(on the clients and on the server) and updates the server params itself, discarding '
      'the params the optimizer returns, so a pruned server optimizer cannot prune its model. '
      'Use fed_avg or fed_prox with prunax_fedjax.server_optimizer.'
    )
  if algorithm not in SERVER_ALGORITHMS:
    raise ValueError(
      f'Unknown FedJAX algorithm {algorithm!r}; valid names are {list(SERVER_ALGORITHMS)}.'
    )
  restore_jax_tree_map()
  return fedjax.optimizers.create_optimizer_from_optax(pruner.wrap_optax(inner))


def sparsify_initial_state(pruner: prunax.BaseUpdater, server_state: Any) -> Any:
  """Applies the server optimizer's initial masks to ``server_state.params``.

  FedJAX's ``init(params)`` keeps the params it is given; sparse-training algorithms
  (static, SET, RigL) draw their masks at init, so without this the first round would
  broadcast the dense model. Other algorithms start with all-ones masks: a no-op for them.

  Args:
    pruner: the pruner given to :func:`server_optimizer`.
    server_state: a FedJAX server state with ``params`` and ``opt_state`` (FedAvg, FedProx).

  Returns:
    ``server_state`` with sparse params.
  """
  return server_state.replace(
    params=pruner.pre_forward_update(server_state.params, server_state.opt_state)
  )


class ClientMaskState(NamedTuple):
  """State of :func:`keep_zeros`: per pruned leaf, the bool keep-mask; None elsewhere."""

  masks: Any


def keep_zeros(pruner: prunax.BaseUpdater) -> optax.GradientTransformation:
  """Zeroes updates of the pruned leaves' weights that were exactly zero at ``init``.

  On a client, ``init`` receives the broadcast server params, whose zeros are the server's
  pruned weights: the client then trains only the weights the server kept.

  Args:
    pruner: gives which leaves are pruned (``pruner.target_sparsities``).

  Returns:
    An optax transformation with state :class:`ClientMaskState`.
  """

  def init(params):
    targets = pruner.target_sparsities(params)
    masks = jax.tree.map(
      lambda s, p: None if s is None else p != 0, targets, params, is_leaf=lambda x: x is None
    )
    return ClientMaskState(masks)

  def update(updates, state, params=None):
    del params
    updates = jax.tree.map(
      lambda m, u: u if m is None else jnp.where(m, u, 0),
      state.masks,
      updates,
      is_leaf=lambda x: x is None,
    )
    return updates, state

  return optax.GradientTransformation(init, update)


def client_optimizer(
  pruner: prunax.BaseUpdater, inner: optax.GradientTransformation
) -> fedjax.optimizers.Optimizer:
  """A FedJAX client optimizer that trains only the weights the server's mask keeps.

  Client updates (deltas) are then zero wherever the broadcast model is, i.e. as sparse as
  the model. The mask is read from the received params (the zeros of the leaves the pruner
  prunes), the only thing FedJAX sends to clients.

  Args:
    pruner: the pruner given to :func:`server_optimizer`.
    inner: the client's optax transformation (e.g. ``optax.sgd(0.05)``).

  Calls :func:`prunax_fedjax.restore_jax_tree_map` (FedJAX's rounds call ``jax.tree_map``).

  Returns:
    A ``fedjax.optimizers.Optimizer`` for the algorithm's ``client_optimizer``.

  Raises:
    ValueError: for drop-and-grow algorithms (SET, RigL). Their regrown weights start at
      exactly zero, which clients cannot tell from pruned ones (so they would never train),
      and RigL grows by the gradients of pruned weights, which sparse clients do not compute.
  """
  _check_pruner(pruner)
  restore_jax_tree_map()
  if isinstance(pruner, prunax.SET):
    raise ValueError(
      f'Client-side sparsity does not support {type(pruner).__name__}: its regrown weights '
      'start at exactly zero, so clients (which see only the params) would treat them as '
      'pruned and never train them, and RigL ranks growth by gradients of pruned weights, '
      'which sparse clients do not compute. Use dense clients, or static_sparse.'
    )
  return fedjax.optimizers.create_optimizer_from_optax(optax.chain(inner, keep_zeros(pruner)))


def update_size(tree: PyTree, index_bytes: int = 4) -> dict[str, int]:
  """Bytes to send ``tree`` dense vs as nonzero values plus their flat indices.

  Args:
    tree: a client update (delta), or the broadcast params, whose nonzeros bound the
      updates of clients trained with :func:`client_optimizer`.
    index_bytes: bytes per index (int32 by default).

  Returns:
    ``{'dense_bytes', 'sparse_bytes', 'nonzero', 'size'}`` over all leaves.
  """
  leaves = jax.tree.leaves(tree)
  nonzero = jax.device_get([jnp.count_nonzero(x) for x in leaves])
  dense = sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves)
  sparse = sum(
    int(nz) * (np.dtype(x.dtype).itemsize + index_bytes)
    for x, nz in zip(leaves, nonzero, strict=True)
  )
  return {
    'dense_bytes': dense,
    'sparse_bytes': sparse,
    'nonzero': int(sum(nonzero)),
    'size': sum(int(np.size(x)) for x in leaves),
  }


def round_diagnostics(params: PyTree, client_sparsity: bool = False) -> dict[str, float]:
  """Sparsity of the broadcast params and the size of one client's upload.

  Args:
    params: the server params broadcast this round.
    client_sparsity: whether clients use :func:`client_optimizer` (then their update is
      nonzero only where ``params`` is), else their update is dense.

  Returns:
    ``{'sparsity'}`` (over leaves with ndim >= 2), ``'upload_dense_bytes'`` and
    ``'upload_sparse_bytes'`` (nonzero values + int32 indices) of one client's update.
  """
  # A dense client's update is nonzero everywhere.
  size = update_size(params if client_sparsity else jax.tree.map(jnp.ones_like, params))
  return {
    'sparsity': prunax.summarize_sparsity(params, only_total=True)['total_sparsity'],
    'upload_dense_bytes': size['dense_bytes'],
    'upload_sparse_bytes': size['sparse_bytes'],
  }

"""prunax for FedJAX: a pruned server optimizer, optional client-side sparsity.

Importing this package patches nothing. FedJAX 0.0.17 calls ``jax.tree_map`` (removed in
JAX 0.6): :func:`server_optimizer` and :func:`client_optimizer` call
:func:`restore_jax_tree_map`, which restores the alias only when JAX lacks it.
"""

from prunax_fedjax._compat import jax_tree_map_needed
from prunax_fedjax._compat import restore_jax_tree_map
from prunax_fedjax.checkpoint import restore_server_state
from prunax_fedjax.checkpoint import save_server_state
from prunax_fedjax.optimizers import ClientMaskState
from prunax_fedjax.optimizers import client_optimizer
from prunax_fedjax.optimizers import keep_zeros
from prunax_fedjax.optimizers import round_diagnostics
from prunax_fedjax.optimizers import server_optimizer
from prunax_fedjax.optimizers import sparsify_initial_state
from prunax_fedjax.optimizers import update_size

__all__ = [
  'ClientMaskState',
  'client_optimizer',
  'jax_tree_map_needed',
  'keep_zeros',
  'restore_jax_tree_map',
  'restore_server_state',
  'round_diagnostics',
  'save_server_state',
  'server_optimizer',
  'sparsify_initial_state',
  'update_size',
]

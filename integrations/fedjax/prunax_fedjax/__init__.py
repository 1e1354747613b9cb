"""prunax for FedJAX: a pruned server optimizer, optional client-side sparsity.

Importing this package restores ``jax.tree_map`` when JAX lacks it (removed in JAX 0.6,
still called by FedJAX 0.0.17); see :func:`prunax_fedjax.restore_jax_tree_map`.
"""

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

JAX_TREE_MAP_RESTORED = restore_jax_tree_map()

__all__ = [
  'JAX_TREE_MAP_RESTORED',
  'ClientMaskState',
  'client_optimizer',
  'keep_zeros',
  'restore_jax_tree_map',
  'restore_server_state',
  'round_diagnostics',
  'save_server_state',
  'server_optimizer',
  'sparsify_initial_state',
  'update_size',
]

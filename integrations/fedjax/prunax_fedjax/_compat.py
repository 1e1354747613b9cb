"""The one fix FedJAX 0.0.17 needs to run on current JAX.

FedJAX 0.0.17 (its last release) calls ``jax.tree_map`` in ``fedjax/core/tree_util.py``
(``tree_weight``, ``tree_zeros_like``, used by every algorithm's server round) and in
``fedjax/core/regularizers.py``. JAX removed that alias in 0.6 in favour of
``jax.tree_util.tree_map``, the function it always pointed to.

Nothing is patched on import: :func:`restore_jax_tree_map` is called by the adapter's entry
functions (:func:`prunax_fedjax.server_optimizer`, :func:`prunax_fedjax.client_optimizer`),
or by a program that runs FedJAX without them.
"""

import jax


def jax_tree_map_needed() -> bool:
  """Whether FedJAX needs :func:`restore_jax_tree_map`: JAX lacks ``jax.tree_map`` (>= 0.6)."""
  return not hasattr(jax, 'tree_map')


def restore_jax_tree_map() -> bool:
  """Restores ``jax.tree_map`` as ``jax.tree_util.tree_map`` when JAX lacks it.

  Does nothing on JAX versions that still have the alias (<= 0.5), so it never replaces an
  existing attribute (idempotent).

  Returns:
    True if the alias was missing and has been added, False if JAX already had it.
  """
  if not jax_tree_map_needed():
    return False
  jax.tree_map = jax.tree_util.tree_map
  return True

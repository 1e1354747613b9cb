"""jaxpruner's top-k functions: ``fn(scores, sparsity) -> uint8 keep-mask``.

Each is prunax's exact selection for a sparsity structure (``round(sparsity * n)`` zeros,
ties to the lowest index); see :mod:`prunax.sparsity_types`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunax import sparsity_types
from prunax.compat.updater_args import MASK_DTYPE
from prunax.compat.updater_args import TopK

__all__ = ['MASK_DTYPE', 'get_topk_fn', 'topk_mask_calculator', 'topk_n_by_m_mask_calculator']


def get_topk_fn(sparsity_type) -> TopK:
  """The top-k function of a sparsity type (object, class such as ``Unstructured`` or
  string such as ``'nm_2,4'``)."""
  if isinstance(sparsity_type, type) and issubclass(sparsity_type, sparsity_types.SparsityType):
    sparsity_type = sparsity_type()
  return TopK(sparsity_types.from_string(sparsity_type))


def topk_mask_calculator(scores, sparsity) -> jax.Array:
  """Unstructured keep-mask with ``round(sparsity * size)`` zeros."""
  return TopK(sparsity_types.Unstructured())(jnp.asarray(scores), sparsity)


def topk_n_by_m_mask_calculator(scores, sparsity, sparsity_type) -> jax.Array:
  """N:M keep-mask along ``sparsity_type.axis`` (dense where ``sparsity`` is 0)."""
  return TopK(sparsity_type)(jnp.asarray(scores), sparsity)

"""jaxpruner's sparsity distributions: prunax's, except that ``erk`` of a single array is
an error (jaxpruner's ``erk`` needs a parameter tree; prunax's returns the array's
sparsity)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from prunax.sparsity_distributions import KERNEL_FILTER_FN
from prunax.sparsity_distributions import NOT_DIM_ONE_FILTER_FN
from prunax.sparsity_distributions import erk as _erk
from prunax.sparsity_distributions import get_sparsities_erdos_renyi
from prunax.sparsity_distributions import uniform

__all__ = [
  'KERNEL_FILTER_FN',
  'NOT_DIM_ONE_FILTER_FN',
  'erk',
  'get_sparsities_erdos_renyi',
  'uniform',
]


@functools.wraps(_erk)
def erk(param_tree: Any, sparsity: Any = None, *args: Any, **kwargs: Any) -> Any:
  """prunax's :func:`prunax.sparsity_distributions.erk`; a single array is an error.

  Raises:
    ValueError: ``param_tree`` is one array (ERK distributes a sparsity over several).
  """
  if isinstance(param_tree, (jax.Array, np.ndarray)):
    raise ValueError(
      f'erk got a single array of shape {np.shape(param_tree)}; it distributes sparsity '
      'over a tree of parameters. Single parameter is provided. Please provide a '
      'paramater tree.'
    )
  return _erk(param_tree, sparsity, *args, **kwargs)

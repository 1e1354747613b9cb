"""prunax for t5x: pruned optax transformations in t5x training, configured with gin.

``pruned_optax`` builds the transformation; ``PrunedOptaxWrapper`` (importing it imports t5x)
is t5x's ``OptaxWrapper`` that also partitions the pruner's state like the params;
``SparsityMetrics`` (also imports t5x) puts the params' sparsity in t5x's train summaries.
"""

from typing import Any

from prunax_t5x.optimizer import pruned_optax
from prunax_t5x.partitioning import sparse_state_logical_axes

__all__ = ['PrunedOptaxWrapper', 'SparsityMetrics', 'pruned_optax', 'sparse_state_logical_axes']


def __getattr__(name: str) -> Any:
  # t5x is not a declared dependency: import it only when the wrapper is asked for.
  if name == 'PrunedOptaxWrapper':
    from prunax_t5x.optax_wrapper import PrunedOptaxWrapper

    return PrunedOptaxWrapper
  if name == 'SparsityMetrics':
    from prunax_t5x.metrics import SparsityMetrics

    return SparsityMetrics
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""jaxpruner's global pruners with its defaults (see :mod:`prunax.compat.jaxpruner._classes`):
``sparsity=0.0``, and ``use_normalization=True``: each leaf's scores are divided by their
L2 norm plus ``normalization_eps`` before the one global threshold."""

from prunax import algorithms as _algorithms
from prunax.compat.jaxpruner._classes import compat_class
from prunax.compat.jaxpruner._classes import normalized_global_masks

__all__ = ['GlobalMagnitudePruning', 'GlobalSaliencyPruning']


def _global(base):
  cls = compat_class(base, __name__, use_normalization=True, normalization_eps=1e-8)

  def masks_from_scores(self, scores, sparsities):
    return normalized_global_masks(self, scores, sparsities, super(cls, self).masks_from_scores)

  cls.masks_from_scores = masks_from_scores
  return cls


GlobalMagnitudePruning = _global(_algorithms.GlobalMagnitudePruning)
GlobalSaliencyPruning = _global(_algorithms.GlobalSaliencyPruning)

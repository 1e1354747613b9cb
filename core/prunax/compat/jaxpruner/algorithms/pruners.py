"""jaxpruner's pruners with its defaults (see :mod:`prunax.compat.jaxpruner._classes`)."""

from prunax import algorithms as _algorithms
from prunax.compat.jaxpruner._classes import compat_class

__all__ = ['MagnitudePruning', 'RandomPruning', 'SaliencyPruning']

MagnitudePruning = compat_class(_algorithms.MagnitudePruning, __name__)
SaliencyPruning = compat_class(_algorithms.SaliencyPruning, __name__)
RandomPruning = compat_class(_algorithms.RandomPruning, __name__)

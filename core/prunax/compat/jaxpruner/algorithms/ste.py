"""jaxpruner's STE pruners with its defaults (see :mod:`prunax.compat.jaxpruner._classes`)."""

from prunax import algorithms as _algorithms
from prunax.compat.jaxpruner._classes import compat_class

__all__ = ['SteMagnitudePruning', 'SteRandomPruning']

SteMagnitudePruning = compat_class(_algorithms.SteMagnitudePruning, __name__)
SteRandomPruning = compat_class(_algorithms.SteRandomPruning, __name__)

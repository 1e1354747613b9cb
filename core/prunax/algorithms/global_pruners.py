"""jaxpruner's module name for the global pruners (``from jaxpruner.algorithms import
global_pruners`` under ``import prunax as jaxpruner``); they live in
:mod:`prunax.algorithms.pruners`."""

from prunax.algorithms.pruners import GlobalMagnitudePruning
from prunax.algorithms.pruners import GlobalSaliencyPruning

__all__ = ['GlobalMagnitudePruning', 'GlobalSaliencyPruning']

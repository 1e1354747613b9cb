"""jaxpruner's ``algorithms`` package: prunax's algorithms with jaxpruner's defaults."""

from prunax.compat.jaxpruner.algorithms import global_pruners
from prunax.compat.jaxpruner.algorithms import pruners
from prunax.compat.jaxpruner.algorithms import sparse_trainers
from prunax.compat.jaxpruner.algorithms import ste
from prunax.compat.jaxpruner.algorithms.global_pruners import GlobalMagnitudePruning
from prunax.compat.jaxpruner.algorithms.global_pruners import GlobalSaliencyPruning
from prunax.compat.jaxpruner.algorithms.pruners import MagnitudePruning
from prunax.compat.jaxpruner.algorithms.pruners import RandomPruning
from prunax.compat.jaxpruner.algorithms.pruners import SaliencyPruning
from prunax.compat.jaxpruner.algorithms.sparse_trainers import SET
from prunax.compat.jaxpruner.algorithms.sparse_trainers import RigL
from prunax.compat.jaxpruner.algorithms.sparse_trainers import StaticRandomSparse
from prunax.compat.jaxpruner.algorithms.ste import SteMagnitudePruning
from prunax.compat.jaxpruner.algorithms.ste import SteRandomPruning

__all__ = [
  'SET',
  'GlobalMagnitudePruning',
  'GlobalSaliencyPruning',
  'MagnitudePruning',
  'RandomPruning',
  'RigL',
  'SaliencyPruning',
  'StaticRandomSparse',
  'SteMagnitudePruning',
  'SteRandomPruning',
  'global_pruners',
  'pruners',
  'sparse_trainers',
  'ste',
]

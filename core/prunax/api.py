"""jaxpruner's name for the registry (``from jaxpruner import api`` under ``import prunax as
jaxpruner``): :mod:`prunax.registry`'s functions, with prunax's defaults."""

from prunax.registry import ALGORITHM_REGISTRY
from prunax.registry import all_algorithm_names
from prunax.registry import create_updater_from_config
from prunax.registry import get_algorithm
from prunax.registry import register_algorithm

__all__ = [
  'ALGORITHM_REGISTRY',
  'all_algorithm_names',
  'create_updater_from_config',
  'get_algorithm',
  'register_algorithm',
]

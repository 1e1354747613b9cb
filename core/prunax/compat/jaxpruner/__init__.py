"""jaxpruner's public API with jaxpruner's defaults, on prunax's engine.

``import prunax as jaxpruner`` runs most jaxpruner programs (prunax accepts jaxpruner's
arguments, method names and config keys) but keeps prunax's defaults. Programs that depend
on jaxpruner's defaults import this namespace instead::

  from prunax.compat import jaxpruner

Here updaters default to target sparsity 0, uint8 (unpacked) masks, ``NoUpdateSchedule``
and ``rng_seed=PRNGKey(8)``; SET/RigL skip the gradient step on mask updates; global
pruners normalise each leaf's scores; attributes can be assigned (``updater.rng_seed =
...``); schedules follow jaxpruner's step rules; ``erk`` of a single array and an
``NByM`` with ``n > m`` are errors where jaxpruner raises them; ``utils`` and
``mask_calculator`` give jaxpruner's summary keys and top-k functions. ``MIGRATION.md``
lists what still differs.
"""

from prunax.compat.jaxpruner import algorithms
from prunax.compat.jaxpruner import api
from prunax.compat.jaxpruner import base_updater
from prunax.compat.jaxpruner import mask_calculator
from prunax.compat.jaxpruner import sparsity_distributions
from prunax.compat.jaxpruner import sparsity_schedules
from prunax.compat.jaxpruner import sparsity_types
from prunax.compat.jaxpruner import utils
from prunax.compat.jaxpruner.algorithms import SET
from prunax.compat.jaxpruner.algorithms import GlobalMagnitudePruning
from prunax.compat.jaxpruner.algorithms import GlobalSaliencyPruning
from prunax.compat.jaxpruner.algorithms import MagnitudePruning
from prunax.compat.jaxpruner.algorithms import RandomPruning
from prunax.compat.jaxpruner.algorithms import RigL
from prunax.compat.jaxpruner.algorithms import SaliencyPruning
from prunax.compat.jaxpruner.algorithms import StaticRandomSparse
from prunax.compat.jaxpruner.algorithms import SteMagnitudePruning
from prunax.compat.jaxpruner.algorithms import SteRandomPruning
from prunax.compat.jaxpruner.api import ALGORITHM_REGISTRY
from prunax.compat.jaxpruner.api import all_algorithm_names
from prunax.compat.jaxpruner.api import create_updater_from_config
from prunax.compat.jaxpruner.api import register_algorithm
from prunax.compat.jaxpruner.base_updater import BaseUpdater
from prunax.compat.jaxpruner.base_updater import NoPruning
from prunax.compat.jaxpruner.base_updater import SparseState
from prunax.compat.jaxpruner.base_updater import apply_mask
from prunax.compat.jaxpruner.mask_calculator import get_topk_fn
from prunax.compat.jaxpruner.sparsity_schedules import NoUpdateSchedule
from prunax.compat.jaxpruner.sparsity_schedules import OneShotSchedule
from prunax.compat.jaxpruner.sparsity_schedules import PeriodicSchedule
from prunax.compat.jaxpruner.sparsity_schedules import PolynomialSchedule
from prunax.compat.jaxpruner.sparsity_types import SparsityType
from prunax.compat.jaxpruner.utils import summarize_intersection
from prunax.compat.jaxpruner.utils import summarize_sparsity

__all__ = [
  'ALGORITHM_REGISTRY',
  'SET',
  'BaseUpdater',
  'GlobalMagnitudePruning',
  'GlobalSaliencyPruning',
  'MagnitudePruning',
  'NoPruning',
  'NoUpdateSchedule',
  'OneShotSchedule',
  'PeriodicSchedule',
  'PolynomialSchedule',
  'RandomPruning',
  'RigL',
  'SaliencyPruning',
  'SparseState',
  'SparsityType',
  'StaticRandomSparse',
  'SteMagnitudePruning',
  'SteRandomPruning',
  'algorithms',
  'all_algorithm_names',
  'api',
  'apply_mask',
  'base_updater',
  'create_updater_from_config',
  'get_topk_fn',
  'mask_calculator',
  'register_algorithm',
  'sparsity_distributions',
  'sparsity_schedules',
  'sparsity_types',
  'summarize_intersection',
  'summarize_sparsity',
  'utils',
]

"""prunax: pruning and sparse training as Optax gradient transformations."""

from prunax import annealing
from prunax import api
from prunax import compat
from prunax import engines
from prunax import export
from prunax import flops
from prunax import lottery
from prunax import masks
from prunax import oneshot
from prunax import pruning_at_init
from prunax import selection
from prunax import shrinking
from prunax import sparse_inference
from prunax import sparsity_distributions
from prunax import sparsity_schedules
from prunax import sparsity_types
from prunax import state
from prunax import strategies
from prunax import tree_util
from prunax.algorithms import ACDC
from prunax.algorithms import MEST
from prunax.algorithms import NMSET
from prunax.algorithms import SET
from prunax.algorithms import SNFS
from prunax.algorithms import SRSTE
from prunax.algorithms import STR
from prunax.algorithms import AutoSparse
from prunax.algorithms import GlobalMagnitudePruning
from prunax.algorithms import GlobalSaliencyPruning
from prunax.algorithms import GraNet
from prunax.algorithms import MagnitudePruning
from prunax.algorithms import NMRigL
from prunax.algorithms import NoPruning
from prunax.algorithms import RandomPruning
from prunax.algorithms import RigL
from prunax.algorithms import SaliencyPruning
from prunax.algorithms import StaticRandomSparse
from prunax.algorithms import SteMagnitudePruning
from prunax.algorithms import SteRandomPruning
from prunax.algorithms import TopKAST
from prunax.algorithms import TopKASTGA
from prunax.algorithms import summarize_thresholds
from prunax.annealing import GradientAnnealing
from prunax.base_updater import BaseUpdater
from prunax.base_updater import SparseState
from prunax.base_updater import apply_mask
from prunax.base_updater import bool_masks
from prunax.base_updater import get_sparse_state
from prunax.base_updater import pack_mask
from prunax.base_updater import packing_aligned
from prunax.base_updater import unpack_mask
from prunax.base_updater import unpack_masks
from prunax.compat.jaxpruner import mask_calculator
from prunax.compat.jaxpruner import utils
from prunax.registry import ALGORITHM_REGISTRY
from prunax.registry import all_algorithm_names
from prunax.registry import create_updater_from_config
from prunax.registry import get_algorithm
from prunax.registry import register_algorithm
from prunax.shrinking import GroupPruning
from prunax.shrinking import find_groups
from prunax.shrinking import group_masks
from prunax.shrinking import shrink
from prunax.sparsity_types import Block
from prunax.sparsity_types import Channel
from prunax.sparsity_types import NByM
from prunax.sparsity_types import SparsityType
from prunax.sparsity_types import Unstructured
from prunax.summary import summarize_intersection
from prunax.summary import summarize_sparsity

# jaxpruner's names (`import prunax as jaxpruner`; see MIGRATION.md): ALGORITHM_REGISTRY,
# apply_mask, SparsityType, utils, mask_calculator, api, algorithms.global_pruners,
# base_updater.NoPruning, and the spelling of its paper:
NbyM = NByM

__version__ = '0.1.0'

__all__ = [
  'SET',
  'SRSTE',
  'STR',
  'AutoSparse',
  'GradientAnnealing',
  'TopKAST',
  'TopKASTGA',
  'annealing',
  'export',
  'flops',
  'lottery',
  'oneshot',
  'pruning_at_init',
  'summarize_thresholds',
  'BaseUpdater',
  'Block',
  'Channel',
  'GlobalMagnitudePruning',
  'GlobalSaliencyPruning',
  'MagnitudePruning',
  'NByM',
  'NoPruning',
  'RandomPruning',
  'RigL',
  'SaliencyPruning',
  'SparseState',
  'StaticRandomSparse',
  'SteMagnitudePruning',
  'SteRandomPruning',
  'Unstructured',
  'all_algorithm_names',
  'create_updater_from_config',
  'get_algorithm',
  'get_sparse_state',
  'pack_mask',
  'packing_aligned',
  'register_algorithm',
  'selection',
  'sparsity_distributions',
  'shrinking',
  'sparse_inference',
  'sparsity_schedules',
  'sparsity_types',
  'summarize_intersection',
  'summarize_sparsity',
  'unpack_mask',
  'unpack_masks',
  'bool_masks',
  'GroupPruning',
  'find_groups',
  'group_masks',
  'shrink',
  'ALGORITHM_REGISTRY',
  'NbyM',
  'SparsityType',
  'api',
  'apply_mask',
  'compat',
  'mask_calculator',
  'utils',
  'ACDC',
  'GraNet',
  'MEST',
  'NMRigL',
  'NMSET',
  'SNFS',
  'engines',
  'masks',
  'state',
  'strategies',
  'tree_util',
]

"""Pruning and sparse-training algorithms."""

from prunax.algorithms import global_pruners
from prunax.algorithms.acdc import ACDC
from prunax.algorithms.acdc import AlternatingSchedule
from prunax.algorithms.autosparse import STR
from prunax.algorithms.autosparse import AutoSparse
from prunax.algorithms.autosparse import summarize_thresholds
from prunax.algorithms.granet import GraNet
from prunax.algorithms.mest import MEST
from prunax.algorithms.nm_drop_and_grow import NMSET
from prunax.algorithms.nm_drop_and_grow import NMRigL
from prunax.algorithms.pruners import GlobalMagnitudePruning
from prunax.algorithms.pruners import GlobalSaliencyPruning
from prunax.algorithms.pruners import MagnitudePruning
from prunax.algorithms.pruners import NoPruning
from prunax.algorithms.pruners import RandomPruning
from prunax.algorithms.pruners import SaliencyPruning
from prunax.algorithms.snfs import SNFS
from prunax.algorithms.sparse_trainers import SET
from prunax.algorithms.sparse_trainers import RigL
from prunax.algorithms.sparse_trainers import StaticRandomSparse
from prunax.algorithms.sr_ste import SRSTE
from prunax.algorithms.ste import SteMagnitudePruning
from prunax.algorithms.ste import SteRandomPruning
from prunax.algorithms.topkast import TopKAST
from prunax.algorithms.topkast import TopKASTGA

__all__ = [
  'STR',
  'AutoSparse',
  'SRSTE',
  'TopKAST',
  'TopKASTGA',
  'summarize_thresholds',
  'global_pruners',
  'GlobalMagnitudePruning',
  'GlobalSaliencyPruning',
  'MagnitudePruning',
  'NoPruning',
  'RandomPruning',
  'RigL',
  'SET',
  'SaliencyPruning',
  'StaticRandomSparse',
  'SteMagnitudePruning',
  'SteRandomPruning',
  'ACDC',
  'AlternatingSchedule',
  'GraNet',
  'MEST',
  'NMRigL',
  'NMSET',
  'SNFS',
]

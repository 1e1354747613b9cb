"""jaxpruner's ``base_updater`` module: ``BaseUpdater`` and ``NoPruning`` with jaxpruner's
defaults (see :mod:`prunax.compat.jaxpruner._classes`)."""

from prunax import algorithms as _algorithms
from prunax import base_updater as _base
from prunax.base_updater import SparseState
from prunax.base_updater import apply_mask
from prunax.compat.jaxpruner._classes import compat_class

__all__ = ['BaseUpdater', 'NoPruning', 'SparseState', 'apply_mask']

BaseUpdater = compat_class(_base.BaseUpdater, __name__)
NoPruning = compat_class(_algorithms.NoPruning, __name__, sparsity_distribution_fn=None)

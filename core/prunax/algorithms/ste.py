"""Straight-through estimator (STE) pruning.

The dense weights live in the optimizer state; the params the model sees are their
projection on a mask recomputed at every step from the dense weights, at the schedule's
sparsity. Gradients taken at the sparse weights update the dense ones (Bengio et al.,
2013; Zhou et al., 2021 for N:M).
"""

from __future__ import annotations

import dataclasses

from prunax.algorithms.pruners import MagnitudePruning
from prunax.algorithms.pruners import RandomPruning


@dataclasses.dataclass(frozen=True)
class SteMagnitudePruning(MagnitudePruning):
  """STE with magnitude scores ``|w|`` of the dense weights."""

  is_ste = True


@dataclasses.dataclass(frozen=True)
class SteRandomPruning(RandomPruning):
  """STE with random scores, redrawn at every step."""

  is_ste = True

"""GraNet: gradual magnitude pruning with zero-initialised regrowth by gradient.

Liu et al., 2021 ("Sparse Training via Boosting Pruning Plasticity with
Neuroregeneration", NeurIPS): training starts dense and the sparsity follows the
polynomial schedule of gradual pruning (Zhu & Gupta, 2017) to the target; at every mask
update the weights of smallest magnitude are removed down to the schedule's count, then
a fraction ``f`` of the remaining ones is dropped by magnitude and as many weights are
regrown where the gradient is largest, starting at zero (RigL's rule). ``f`` is the drop
fraction, cosine-decayed to 0 at the schedule's end. That is RigL's update with the
schedule's count of active weights, so this class is RigL from a dense start with a
polynomial schedule. (The paper's code prunes the gradual part with one global threshold;
here each leaf follows the distribution's sparsity.)
"""

from __future__ import annotations

import dataclasses

from prunax import sparsity_schedules
from prunax.algorithms.sparse_trainers import RigL
from prunax.base_updater import BaseUpdater


@dataclasses.dataclass(frozen=True)
class GraNet(RigL):
  """RigL from a dense start on a gradual (polynomial) sparsity schedule."""

  scheduler: object = sparsity_schedules.PolynomialSchedule(
    update_freq=100, update_start_step=0, update_end_step=10000
  )
  # Training starts dense: all-ones masks, not RigL's random ones.
  init_masks = BaseUpdater.init_masks
  # The GraNet code (like sparse_learning) steps the optimizer, then updates the masks.
  skip_gradient_on_mask_update = False

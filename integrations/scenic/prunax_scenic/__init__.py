"""prunax for Scenic: prune any Scenic run by adding ``config.sparsity_config``.

In a Scenic config file::

  import ml_collections
  import prunax_scenic

  def get_config():
    config = ...  # an ordinary Scenic config
    config.sparsity_config = ml_collections.ConfigDict({
        'algorithm': 'magnitude', 'sparsity': 0.8, 'dist_type': 'erk',
        'update_freq': 1000, 'update_start_step': 10_000, 'update_end_step': 20_000})
    return prunax_scenic.enable(config)   # opts this config's trainer in

then ``python -m scenic.main --config=... --workdir=...`` as usual. Importing this package
does not import Scenic; :func:`enable` and :func:`pruning` do.
"""

from prunax_scenic.config import SPARSITY_CONFIG_FIELD
from prunax_scenic.config import updater_from_config
from prunax_scenic.trainer import enable
from prunax_scenic.trainer import pruning
from prunax_scenic.trainer import register_sparse_trainer
from prunax_scenic.trainer import sparse_trainer
from prunax_scenic.trainer import sparsity_logs

__all__ = [
  'SPARSITY_CONFIG_FIELD',
  'enable',
  'pruning',
  'register_sparse_trainer',
  'sparse_trainer',
  'sparsity_logs',
  'updater_from_config',
]

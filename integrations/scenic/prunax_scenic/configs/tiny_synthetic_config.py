r"""A tiny sparse Scenic run that trains in seconds on a CPU, offline.

Scenic's ``simple_cnn_classification`` model on the in-memory data set registered by
:mod:`prunax_scenic.synthetic_dataset`, pruned to 80% with magnitude pruning (the first
convolution stays dense, as in the paper's ResNet-50 runs)::

  python -m scenic.main --config=PATH/tiny_synthetic_config.py --workdir=/tmp/tiny \
      --config.sparsity_config.algorithm=rigl

Any ``sparsity_config`` key can be overridden on the command line like that.
"""

import ml_collections

import prunax_scenic


def get_sparsity_config() -> ml_collections.ConfigDict:
  """80% magnitude pruning from step 0 to 10, every 2 steps; the first convolution dense."""
  return ml_collections.ConfigDict(
    {
      'algorithm': 'magnitude',
      'sparsity': 0.8,
      'dist_type': 'uniform',
      'sparsity_type': 'unstructured',
      'update_freq': 2,
      'update_start_step': 0,
      'update_end_step': 10,
      'drop_fraction': 0.1,  # Used by set and rigl only.
      'custom_sparsity_map': {'Conv_0/kernel': 0.0},
    }
  )


def get_config() -> ml_collections.ConfigDict:
  """The tiny config (registers the synthetic data set with Scenic)."""
  from prunax_scenic import synthetic_dataset

  config = ml_collections.ConfigDict()
  config.experiment_name = 'prunax_tiny_synthetic'
  config.dataset_name = synthetic_dataset.DATASET_NAME
  config.dataset_configs = ml_collections.ConfigDict()
  # Set here so that the command line can override them (it cannot add keys).
  config.dataset_configs.num_train_examples = synthetic_dataset.NUM_TRAIN_EXAMPLES
  config.dataset_configs.num_eval_examples = synthetic_dataset.NUM_EVAL_EXAMPLES
  config.data_dtype_str = 'float32'

  config.model_name = 'simple_cnn_classification'
  config.num_filters = [8, 16]
  config.kernel_sizes = [3, 3]
  config.model_dtype_str = 'float32'

  config.trainer_name = 'classification_trainer'
  config.optimizer = 'momentum'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.momentum = 0.9
  config.l2_decay_factor = None
  config.max_grad_norm = None
  config.label_smoothing = None
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant'
  config.lr_configs.base_learning_rate = 0.05
  config.num_training_steps = 20
  config.batch_size = 32
  config.rng_seed = 0

  config.sparsity_config = get_sparsity_config()

  config.log_summary_steps = 5
  config.log_eval_steps = 10
  config.checkpoint_steps = 10
  config.write_summary = True
  config.xprof = False
  config.checkpoint = True
  config.debug_train = False
  config.debug_eval = False
  # Opt in: config.trainer_name becomes 'sparse_classification_trainer'.
  return prunax_scenic.enable(config)

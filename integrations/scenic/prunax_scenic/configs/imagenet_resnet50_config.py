r"""The JaxPruner paper's 80% sparse ResNet-50 on ImageNet, as a Scenic config.

Scenic's own ImageNet ResNet-50 baseline config with the paper's recipe (batch 4096, 100
epochs, L2 1e-4, 5 warm-up epochs) and sparsity: 80% uniform over every kernel except the
first convolution (``stem_conv``), which stays dense (Gale et al., 2019); pruning from step
10k to 25k of ~31k, masks updated every 1000 steps. Needs ImageNet in TFDS and an
accelerator pod::

  python -m scenic.main --config=PATH/imagenet_resnet50_config.py --workdir=... \
      --config.sparsity_config.algorithm=rigl

Algorithms of the paper's table: magnitude, saliency, random, global_magnitude,
magnitude_ste, static_sparse, set, rigl (and no_prune for the dense baseline).
"""

import ml_collections

import prunax_scenic

_IMAGENET_TRAIN_SIZE = 1281167


def get_sparsity_config() -> ml_collections.ConfigDict:
  """The paper's ResNet-50 sparsity settings (Scenic needs not be installed)."""
  return ml_collections.ConfigDict(
    {
      'algorithm': 'magnitude',
      'sparsity': 0.8,
      'dist_type': 'uniform',
      'sparsity_type': 'unstructured',
      'update_freq': 1000,
      'update_start_step': 10_000,
      'update_end_step': 25_000,
      'drop_fraction': 0.1,  # Used by set and rigl only.
      'custom_sparsity_map': {'stem_conv/kernel': 0.0},  # The first convolution stays dense.
    }
  )


def get_config() -> ml_collections.ConfigDict:
  """Scenic's ImageNet ResNet-50 config with the paper's recipe and sparsity."""
  from scenic.projects.baselines.configs.imagenet import imagenet_resnet_config

  config = imagenet_resnet_config.get_config()
  config.experiment_name = 'imagenet_resnet50_prunax'
  config.num_layers = 50
  config.batch_size = 4096
  config.num_training_epochs = 100
  config.l2_decay_factor = 1e-4
  steps_per_epoch = _IMAGENET_TRAIN_SIZE // config.batch_size
  config.lr_configs.base_learning_rate = 0.1 * config.batch_size / 256
  config.lr_configs.warmup_steps = 5 * steps_per_epoch
  config.lr_configs.steps_per_cycle = config.num_training_epochs * steps_per_epoch
  config.checkpoint_steps = 10 * steps_per_epoch
  config.sparsity_config = get_sparsity_config()
  return prunax_scenic.enable(config)

r"""The JaxPruner paper's 80% sparse ViT-B/16 on ImageNet (90 epochs), as a Scenic config.

Scenic's own ImageNet ViT-B/16 baseline config, unchanged, plus sparsity: 80% distributed
with ERK over every parameter with at least two dimensions except the position embedding
and the class token (as in the paper, the attention biases of shape (heads, head_dim) are
in the ERK pool; ERK keeps such small leaves dense); pruning from step 10k to 20k of ~28k,
masks updated every 1000 steps.
Needs ImageNet in TFDS and an accelerator pod::

  python -m scenic.main --config=PATH/imagenet_vit_b16_config.py --workdir=... \
      --config.sparsity_config.algorithm=magnitude_ste
"""

import ml_collections

import prunax_scenic


def get_sparsity_config() -> ml_collections.ConfigDict:
  """The paper's ViT-B/16 sparsity settings (Scenic needs not be installed)."""
  return ml_collections.ConfigDict(
    {
      'algorithm': 'magnitude',
      'sparsity': 0.8,
      'dist_type': 'erk',
      'sparsity_type': 'unstructured',
      'update_freq': 1000,
      'update_start_step': 10_000,
      'update_end_step': 20_000,
      'drop_fraction': 0.1,  # Used by set and rigl only.
      # Kept dense, and out of the ERK budget.
      'custom_sparsity_map': {'Transformer/posembed_input/pos_embedding': 0.0, 'cls': 0.0},
    }
  )


def get_config(runlocal: str = '') -> ml_collections.ConfigDict:
  """Scenic's ImageNet ViT-B/16 config with the paper's sparsity (``runlocal``: batch 8)."""
  from scenic.projects.baselines.configs.imagenet import imagenet_vit_config

  config = imagenet_vit_config.get_config(runlocal)
  config.experiment_name = 'imagenet_vit_b16_prunax'
  config.sparsity_config = get_sparsity_config()
  return prunax_scenic.enable(config)

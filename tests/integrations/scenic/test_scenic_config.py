"""prunax_scenic without Scenic: sparsity configs into updaters, and clear errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import prunax
import prunax_scenic
from prunax_scenic.configs import imagenet_resnet50_config
from prunax_scenic.configs import imagenet_vit_b16_config
from prunax_scenic.configs import tiny_synthetic_config


def _shapes(**named_shapes):
  """A nested params tree of zeros from {'a/b': shape}."""
  tree = {}
  for name, shape in named_shapes.items():
    node = tree
    *parents, leaf = name.split('/')
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = jnp.ones(shape)
  return tree


def _sparsities(updater, params):
  """{name: sparsity or None} of the updater's distribution over params."""
  tree = updater.sparsity_distribution_fn(params, updater.sparsity)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {prunax.sparsity_distributions.path_name(p): v for p, v in flat}


def test_import_does_not_import_scenic():
  code = 'import sys, prunax_scenic; print("scenic" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


def test_resnet50_config_is_the_papers_uniform_80_with_first_conv_dense():
  updater = prunax_scenic.updater_from_config(imagenet_resnet50_config.get_sparsity_config())
  assert isinstance(updater, prunax.MagnitudePruning)
  assert updater.sparsity == 0.8
  assert updater.scheduler == prunax.sparsity_schedules.PolynomialSchedule(
    update_freq=1000, update_start_step=10_000, update_end_step=25_000
  )
  params = _shapes(
    **{
      'stem_conv/kernel': (7, 7, 3, 64),
      'ResidualBlock_0/conv1/kernel': (1, 1, 64, 64),
      'bn_init/scale': (64,),
      'output_projection/kernel': (2048, 1000),
      'output_projection/bias': (1000,),
    }
  )
  assert _sparsities(updater, params) == {
    'ResidualBlock_0/conv1/kernel': 0.8,
    'bn_init/scale': None,
    'output_projection/bias': None,
    'output_projection/kernel': 0.8,
    'stem_conv/kernel': 0.0,
  }


def test_vit_b16_config_is_erk_80_without_position_embedding_and_class_token():
  updater = prunax_scenic.updater_from_config(imagenet_vit_b16_config.get_sparsity_config())
  assert updater.scheduler == prunax.sparsity_schedules.PolynomialSchedule(
    update_freq=1000, update_start_step=10_000, update_end_step=20_000
  )
  params = _shapes(
    **{
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      'cls': (1, 1, 768),
      'embedding/kernel': (16, 16, 3, 768),
      'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': (768, 3072),
      'output_projection/kernel': (768, 1000),
    }
  )
  got = _sparsities(updater, params)
  assert got['Transformer/posembed_input/pos_embedding'] == 0.0 and got['cls'] == 0.0
  erk = [
    'embedding/kernel',
    'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel',
    'output_projection/kernel',
  ]
  sizes = {
    'embedding/kernel': 16 * 16 * 3 * 768,
    erk[1]: 768 * 3072,
    'output_projection/kernel': 768 * 1000,
  }
  kept = sum((1 - got[n]) * sizes[n] for n in erk)
  assert kept == pytest.approx(0.2 * sum(sizes.values()), rel=1e-9)
  # ERK: the patch embedding (sum/prod of its shape is smallest) is pruned the most.
  assert got['embedding/kernel'] > got['output_projection/kernel']


# The algorithm families every host adapter must run (the list).
FAMILIES = (
  'magnitude',
  'saliency',
  'random',
  'global_magnitude',
  'magnitude_ste',
  'static_sparse',
  'set',
  'rigl',
  'autosparse',
)


@pytest.mark.parametrize('algorithm', FAMILIES)
def test_tiny_config_works_with_every_algorithm_family(algorithm):
  cfg = tiny_synthetic_config.get_sparsity_config()
  cfg.algorithm = algorithm
  updater = prunax_scenic.updater_from_config(cfg)
  expected = cfg.to_dict()
  if algorithm not in ('set', 'rigl'):
    del expected['drop_fraction']  # Ignored by algorithms that do not drop and grow.
  assert updater == prunax.create_updater_from_config(expected)
  assert type(updater) is prunax.get_algorithm(algorithm)


@pytest.mark.parametrize('algorithm', sorted(set(prunax.all_algorithm_names()) - set(FAMILIES)))
def test_other_algorithms_build_or_say_what_they_need(algorithm):
  cfg = tiny_synthetic_config.get_sparsity_config()
  cfg.algorithm = algorithm
  try:
    updater = prunax_scenic.updater_from_config(cfg)
  except ValueError as error:  # e.g. SNIP needs a loss function and a batch.
    assert 'needs' in str(error)
  else:
    assert type(updater) is prunax.get_algorithm(algorithm)


def test_custom_sparsity_map_as_pairs_allows_regexes_with_dots():
  cfg = ml_collections.ConfigDict(
    {
      'algorithm': 'magnitude',
      'sparsity': 0.5,
      'custom_sparsity_map': (('.*/pos_embedding', 0.0), ('head/kernel', 0.25)),
    }
  )
  updater = prunax_scenic.updater_from_config(cfg)
  params = _shapes(**{'enc/pos_embedding': (1, 4, 8), 'head/kernel': (8, 2), 'mlp/kernel': (8, 8)})
  assert _sparsities(updater, params) == {
    'enc/pos_embedding': 0.0,
    'head/kernel': 0.25,
    'mlp/kernel': 0.5,
  }


def test_a_plain_dict_works_and_the_wrapped_optimizer_prunes():
  updater = prunax_scenic.updater_from_config(
    {'algorithm': 'magnitude', 'sparsity': 0.5, 'update_start_step': 0}
  )
  params = {'w': jnp.arange(1.0, 9.0).reshape(2, 4)}
  tx = updater.wrap_optax(optax.sgd(0.0))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['w'], [[0, 0, 0, 0], [5, 6, 7, 8]])


@pytest.mark.parametrize(
  'sparsity_config, message',
  [
    ('magnitude', 'must be an ml_collections.ConfigDict or a dict'),
    ({'sparsity': 0.8}, 'needs an "algorithm"'),
    ({'algorithm': 'magnitud', 'sparsity': 0.8}, "Unknown algorithm 'magnitud'"),
    ({'algorithm': 'magnitude', 'sparsity': 1.2}, 'must be in [0, 1), got 1.2'),
    ({'algorithm': 'magnitude', 'sparsity': 'high'}, "got 'high'"),
    ({'algorithm': 'magnitude'}, 'needs a target sparsity'),
    ({'algorithm': 'magnitude', 'sparsity': 0.8, 'sparsty': 0.8}, "keys ['sparsty']"),
    ({'algorithm': 'magnitude', 'sparsity': 0.8, 'dist_type': 'erk2'}, "'erk2'"),
    ({'algorithm': 'magnitude', 'sparsity': 0.8, 'sparsity_type': 'nm_2'}, 'nm_2'),
    (
      {'algorithm': 'magnitude', 'sparsity': 0.8, 'update_start_step': 20, 'update_end_step': 10},
      'update_end_step=10 precedes update_start_step=20',
    ),
    (
      {'algorithm': 'magnitude', 'sparsity': 0.8, 'update_freq': 0, 'update_end_step': 10},
      'update_freq must be an integer >= 1, got 0',
    ),
    (
      {'algorithm': 'magnitude', 'sparsity': 0.8, 'custom_sparsity_map': ['stem_conv/kernel']},
      'custom_sparsity_map must be a mapping',
    ),
    (
      {'algorithm': 'magnitude', 'sparsity': 0.8, 'filter_fn': 'ndim>1'},
      "filter_fn must be a callable fn(name, param) -> bool, got 'ndim>1'",
    ),
    (
      {'algorithm': 'global_magnitude', 'sparsity': 0.8, 'sparsity_type': 'nm_2,4'},
      'supports only unstructured sparsity',
    ),
  ],
)
def test_bad_configs_raise_clear_errors(sparsity_config, message):
  with pytest.raises(ValueError) as error:
    prunax_scenic.updater_from_config(sparsity_config)
  assert message in str(error.value)


def test_custom_map_name_that_matches_no_parameter_fails_at_init():
  updater = prunax_scenic.updater_from_config(
    {'algorithm': 'magnitude', 'sparsity': 0.8, 'custom_sparsity_map': {'stem/kernel': 0.0}}
  )
  with pytest.raises(ValueError, match="'stem/kernel' matches no parameter"):
    updater.wrap_optax(optax.sgd(0.1)).init({'stem_conv': {'kernel': jnp.ones((3, 3))}})


def test_sparse_trainer_runs_dense_configs_unchanged_and_rejects_bad_ones_early():
  calls = []

  def train(*, rng, config, writer):
    calls.append((rng, config, writer))
    return 'trained'

  wrapped = prunax_scenic.sparse_trainer(train)
  assert prunax_scenic.sparse_trainer(wrapped) is wrapped
  dense = ml_collections.ConfigDict({'batch_size': 8})
  assert wrapped(rng=1, config=dense, writer='w') == 'trained'
  assert calls == [(1, dense, 'w')]
  bad = ml_collections.ConfigDict({'sparsity_config': {'algorithm': 'magnitud'}})
  with pytest.raises(ValueError, match="Unknown algorithm 'magnitud'"):
    wrapped(rng=1, config=bad, writer='w')
  assert len(calls) == 1  # Never started training.

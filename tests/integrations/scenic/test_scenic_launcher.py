"""prunax_scenic with the real Scenic: its launcher, its trainer, checkpoints and summaries.

Runs ``python -m scenic.main`` on the tiny config (Scenic's classification trainer under
``jax.pmap`` on 2 CPU devices), then reads the checkpoints and the event files Scenic's
metric writer wrote. Other algorithm families run Scenic's trainer in-process.
"""

import collections.abc
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import prunax
import prunax_scenic
from prunax_scenic.configs import imagenet_resnet50_config
from prunax_scenic.configs import imagenet_vit_b16_config
from prunax_scenic.configs import tiny_synthetic_config
from tests.xla_env import cpu_env

HAS_SCENIC = (
  importlib.util.find_spec('scenic') is not None
  and importlib.util.find_spec('scenic.train_lib') is not None
)
pytestmark = [
  pytest.mark.skipif(not HAS_SCENIC, reason='scenic is not installed'),
  pytest.mark.slow,
]

STEPS = 20  # tiny config: num_training_steps; pruning ends at step 10; checkpoints 11, 20.
# Kernels of the tiny model: 80% of Conv_1 and output_projection, Conv_0 dense.
SIZES = {
  'Conv_0/kernel': 3 * 3 * 1 * 8,
  'Conv_1/kernel': 3 * 3 * 8 * 16,
  'output_projection/kernel': 16 * 4,
}
EXPECTED_ZEROS = {
  'Conv_0/kernel': 0,
  'Conv_1/kernel': round(0.8 * 1152),
  'output_projection/kernel': round(0.8 * 64),
}


def _launch(workdir, *overrides, devices=2):
  """Runs Scenic's own launcher on the tiny config; returns its log."""
  env = cpu_env(devices)
  cmd = [
    sys.executable,
    '-m',
    'scenic.main',
    f'--config={tiny_synthetic_config.__file__}',
    f'--workdir={workdir}',
    *overrides,
  ]
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  return run.stderr


def _checkpoint(workdir, step):
  from flax.training import checkpoints

  return checkpoints.restore_checkpoint(os.path.join(workdir, f'checkpoint_{step}'), None)


def _unpacked(masks, params):
  """Boolean masks from stored ones (1 bit per weight packed along the last axis, or uint8)."""
  if isinstance(masks, collections.abc.Mapping):
    return {k: _unpacked(v, params[k]) for k, v in masks.items()}
  if masks is None or isinstance(masks, optax.MaskedNode):  # A leaf that is not pruned.
    return None
  return np.asarray(prunax.unpack_masks(np.asarray(masks), np.asarray(params)))


def _zeros(tree):
  """{name: number of zeros} of the kernels."""
  return {
    n: int(np.sum(np.asarray(x) == 0))
    for n, x in prunax.sparsity_distributions.named_leaves(tree)
    if np.ndim(x) >= 2
  }


def _scalars(workdir):
  """{tag: {step: value}} from the event files Scenic's metric writer wrote."""
  import tensorflow as tf

  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _check_sparsity_summaries(scalars, params, step):
  """The summary at ``step`` is the sparsity of ``params`` (constant since step 11)."""
  zeros = _zeros(params)
  for name, size in SIZES.items():
    assert scalars[f'sparsity/{name}'][step] == pytest.approx(zeros[name] / size, abs=1e-6)
  assert scalars['total_sparsity'][step] == pytest.approx(
    sum(zeros.values()) / sum(SIZES.values()), abs=1e-6
  )


def _accuracy(params, model_state):
  """Accuracy of Scenic's tiny model with ``params`` on the whole evaluation split."""
  from scenic.model_lib import models

  from prunax_scenic import synthetic_dataset

  config = tiny_synthetic_config.get_config()
  model = models.get_model_cls(config.model_name)(
    config, {'num_classes': synthetic_dataset.NUM_CLASSES, 'target_is_onehot': False}
  )
  data = synthetic_dataset.make_examples(synthetic_dataset.NUM_EVAL_EXAMPLES, seed=1)
  logits = model.flax_model.apply({'params': params, **model_state}, data['inputs'], train=False)
  return float(np.mean(np.argmax(logits, -1) == data['label']))


def test_launcher_magnitude_checkpoints_summaries_and_eval_are_sparse(tmp_path):
  log = _launch(tmp_path)
  assert 'device_count: 2' in log
  state = _checkpoint(tmp_path, STEPS)
  assert _zeros(state['params']) == EXPECTED_ZEROS
  masks = _unpacked(state['opt_state']['masks'], state['params'])
  assert _zeros(masks) == EXPECTED_ZEROS
  # Halfway through the schedule (step 11: last update at step 10 = the end) already 80%.
  assert _zeros(_checkpoint(tmp_path, 11)['params']) == EXPECTED_ZEROS
  scalars = _scalars(tmp_path)
  _check_sparsity_summaries(scalars, state['params'], STEPS)
  assert scalars['total_sparsity'][1] == 0.0  # Nothing pruned before the first update.
  # Scenic evaluated the sparse params it saved.
  assert scalars['valid_accuracy'][STEPS] == pytest.approx(
    _accuracy(state['params'], state['model_state']), abs=1e-6
  )


def test_launcher_ste_keeps_dense_weights_and_saves_sparse_params(tmp_path):
  _launch(tmp_path, '--config.sparsity_config.algorithm=magnitude_ste')
  state = _checkpoint(tmp_path, STEPS)
  assert _zeros(state['params']) == EXPECTED_ZEROS
  dense = state['opt_state']['algorithm_state']['dense_params']
  assert all(v == 0 for v in _zeros(dense).values())
  for name in SIZES:
    path = name.split('/')
    mask = _unpacked(state['opt_state']['masks'], state['params'])[path[0]][path[1]]
    np.testing.assert_allclose(
      state['params'][path[0]][path[1]], np.where(mask, dense[path[0]][path[1]], 0), atol=1e-6
    )
  _check_sparsity_summaries(_scalars(tmp_path), state['params'], STEPS)


def test_launcher_rigl_resumes_and_moves_its_masks(tmp_path):
  rigl = (
    '--config.sparsity_config.algorithm=rigl',
    '--config.sparsity_config.update_end_step=20',
  )  # Drop and grow until step 20.
  _launch(tmp_path, *rigl, '--config.num_training_steps=12')
  log = _launch(tmp_path, *rigl)  # Resumes from checkpoint 12 to step 20.
  assert 'Starting training loop at step 13.' in log
  first, state = _checkpoint(tmp_path, 12), _checkpoint(tmp_path, STEPS)
  # RigL is at 80% from the start, and moved connections between the checkpoints.
  first_masks = _unpacked(first['opt_state']['masks'], first['params'])
  masks = _unpacked(state['opt_state']['masks'], state['params'])
  assert _zeros(first_masks) == EXPECTED_ZEROS
  assert _zeros(masks) == EXPECTED_ZEROS
  moved = prunax.summarize_intersection(first_masks, masks)
  assert 0.5 < moved['total_iou'] < 1.0
  for name in SIZES:
    a, b = name.split('/')
    assert np.all(state['params'][a][b][~masks[a][b]] == 0)
  # Grown connections start at zero, so params may be a little sparser than the masks.
  scalars = _scalars(tmp_path)
  mask_sparsity = sum(EXPECTED_ZEROS.values()) / sum(SIZES.values())
  assert scalars['total_sparsity'][1] >= mask_sparsity - 1e-6  # Sparse from step 1.
  assert {1, 11, 13, 16, STEPS} <= set(scalars['total_sparsity'])
  for name, size in SIZES.items():
    assert scalars[f'sparsity/{name}'][STEPS] >= EXPECTED_ZEROS[name] / size - 1e-6


# One batch holds the whole training set (reshuffled each epoch): every step sees the same
# examples, so a relaunch, whose data stream starts over, trains on the same data as an
# uninterrupted run.
ONE_BATCH = ('--config.dataset_configs.num_train_examples=32',)


@pytest.mark.parametrize('algorithm', ['magnitude', 'rigl', 'magnitude_ste'])
def test_relaunch_into_workdir_matches_uninterrupted_run(tmp_path, algorithm):
  """12 steps, the same command to 20 steps, vs 20 steps in one launch."""
  flags = (
    *ONE_BATCH,
    f'--config.sparsity_config.algorithm={algorithm}',
    '--config.sparsity_config.update_end_step=16',
  )  # Masks change after the relaunch.
  whole, interrupted = tmp_path / 'whole', tmp_path / 'interrupted'
  _launch(whole, *flags)
  _launch(interrupted, *flags, '--config.num_training_steps=12')
  assert 'Starting training loop at step 13.' in _launch(interrupted, *flags)
  got, want = _checkpoint(interrupted, STEPS), _checkpoint(whole, STEPS)
  # Scenic's checkpoint also holds wall-clock timings (metadata/chrono): not training state.
  assert set(got) == set(want) and 'params' in got and 'opt_state' in got
  got, want = ({k: v for k, v in c.items() if k != 'metadata'} for c in (got, want))
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for (path, a), b in zip(got_leaves, want_leaves):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, name
    if a.dtype.kind == 'f':
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    else:  # Masks, the pruner's count and RNG key, Scenic's step.
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert int(got['opt_state']['count']) == STEPS


class RecordingWriter:
  """A clu metric writer keeping the scalars it is given."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self.scalars.setdefault(key, {})[int(step)] = float(value)

  def __getattr__(self, name):  # write_images, flush, ...: accepted and dropped.
    return lambda *args, **kwargs: None


@pytest.mark.parametrize(
  'algorithm', ['saliency', 'random', 'global_magnitude', 'static_sparse', 'set', 'autosparse']
)
def test_scenic_trainer_runs_every_algorithm_family(tmp_path, algorithm):
  from scenic.model_lib import models
  from scenic.train_lib import train_utils
  from scenic.train_lib import trainers

  config = tiny_synthetic_config.get_config()  # Opted in by prunax_scenic.enable(config).
  config.sparsity_config.algorithm = algorithm
  config.sparsity_config.update_end_step = 4
  config.num_training_steps = 8
  config.log_summary_steps = 6  # Summaries at steps 1, 7 and 8: the last one is step 8 alone.
  config.log_eval_steps = 8
  config.checkpoint = False
  writer = RecordingWriter()
  data_rng, rng = jax.random.split(jax.random.PRNGKey(0))
  train_state, _, eval_summary = trainers.get_trainer(config.trainer_name)(
    rng=rng,
    config=config,
    model_cls=models.get_model_cls(config.model_name),
    dataset=train_utils.get_dataset(config, data_rng),
    workdir=str(tmp_path),
    writer=writer,
  )
  assert 0.0 <= eval_summary['accuracy'] <= 1.0
  state = jax.device_get(jax.tree.map(lambda x: x[0], train_state))
  sparse_state = prunax.get_sparse_state(state.opt_state)
  masks = _unpacked(jax.device_get(sparse_state.masks), jax.device_get(state.params))
  zeros = _zeros(state.params)
  if algorithm == 'autosparse':  # Learned sparsity: params = soft threshold of dense weights.
    from prunax.algorithms.autosparse import soft_threshold

    for name in SIZES:
      a, b = name.split('/')
      np.testing.assert_allclose(
        state.params[a][b],
        soft_threshold(
          sparse_state.algorithm_state.dense_params[a][b],
          sparse_state.algorithm_state.thresholds[a][b],
        ),
        atol=1e-6,
      )
    assert sum(zeros.values()) > 0
  elif algorithm == 'global_magnitude':  # One threshold over Conv_1 and output_projection.
    mask_zeros = _zeros(masks)
    assert mask_zeros['Conv_0/kernel'] == 0
    pool = SIZES['Conv_1/kernel'] + SIZES['output_projection/kernel']
    assert sum(mask_zeros.values()) == prunax.sparsity_types.num_zeros(0.8, pool)
  else:
    assert _zeros(masks) == EXPECTED_ZEROS
  if algorithm != 'autosparse':
    for name in SIZES:
      a, b = name.split('/')
      assert np.all(state.params[a][b][~masks[a][b]] == 0)
  assert writer.scalars['total_sparsity'][8] == pytest.approx(
    sum(zeros.values()) / sum(SIZES.values()), abs=1e-6
  )
  for name, size in SIZES.items():
    assert writer.scalars[f'sparsity/{name}'][8] == pytest.approx(zeros[name] / size, abs=1e-6)


@pytest.mark.parametrize('config_module', [imagenet_resnet50_config, imagenet_vit_b16_config])
def test_paper_configs_fit_scenics_models(config_module):
  import jax.numpy as jnp
  from scenic.model_lib import models

  config = config_module.get_config()
  model = models.get_model_cls(config.model_name)(
    config, {'num_classes': 1000, 'target_is_onehot': False}
  )
  variables = jax.eval_shape(
    lambda: model.flax_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )
  params = variables['params']
  updater = prunax_scenic.updater_from_config(config.sparsity_config)
  sparsities = dict(
    prunax.sparsity_distributions.named_leaves(
      updater.target_sparsities(params), is_leaf=lambda x: x is None
    )
  )
  sizes = {n: int(np.prod(x.shape)) for n, x in prunax.sparsity_distributions.named_leaves(params)}
  pruned = {n: s for n, s in sparsities.items() if s is not None}
  dense = set(config.sparsity_config.custom_sparsity_map)
  assert all(pruned[n] == 0.0 for n in dense)
  assert set(pruned) == {
    n for n, x in prunax.sparsity_distributions.named_leaves(params) if x.ndim >= 2
  }
  pool = [n for n in pruned if n not in dense]
  kept = sum((1 - pruned[n]) * sizes[n] for n in pool)
  assert kept == pytest.approx(0.2 * sum(sizes[n] for n in pool), rel=1e-6)
  if config_module is imagenet_resnet50_config:
    assert {pruned[n] for n in pool} == {0.8}  # Uniform.
    assert sum(sizes[n] for n in pool) > 25_000_000
  else:
    assert len({pruned[n] for n in pool}) > 2  # ERK; it keeps the small leaves dense:
    assert pruned['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/bias'] == 0.0
    assert sum(sizes[n] for n in pool) > 85_000_000


def test_enable_opts_in_one_config_and_replaces_no_trainer():
  from scenic.train_lib import classification_trainer
  from scenic.train_lib import trainers
  from scenic.train_lib.transfer import transfer_trainer

  config = tiny_synthetic_config.get_config()
  assert config.trainer_name == 'sparse_classification_trainer'
  sparse = trainers.get_trainer('sparse_classification_trainer')
  assert sparse.__wrapped__ is classification_trainer.train
  # The registered trainers are untouched: other configs (and --config.trainer_name=
  # classification_trainer) train dense.
  assert trainers.get_trainer('classification_trainer') is classification_trainer.train
  assert trainers.get_trainer('transfer_trainer') is transfer_trainer.train
  assert 'sparse_transfer_trainer' not in trainers.ALL_TRAINERS  # Only what was opted in.
  # Idempotent: again, or with the sparse name.
  assert prunax_scenic.enable(config) is config
  assert config.trainer_name == 'sparse_classification_trainer'
  assert trainers.get_trainer('sparse_classification_trainer') is sparse
  assert prunax_scenic.register_sparse_trainer('classification_trainer') == (
    'sparse_classification_trainer'
  )

  with pytest.raises(
    ValueError,
    match=r"No Scenic trainer named 'classification'; registered "
    r"trainers are \['classification_trainer'",
  ):
    prunax_scenic.register_sparse_trainer('classification')
  dense = tiny_synthetic_config.get_config()
  del dense.sparsity_config
  with pytest.raises(ValueError, match='needs config.sparsity_config'):
    prunax_scenic.enable(dense)
  dense.sparsity_config = {'algorithm': 'magnitud'}
  with pytest.raises(ValueError, match="Unknown algorithm 'magnitud'"):
    prunax_scenic.enable(dense)


_IMPORT_CONFIG = """
import sys
from scenic.train_lib import trainers
before = dict(trainers.ALL_TRAINERS)
import prunax_scenic.configs.tiny_synthetic_config
import prunax_scenic.configs.imagenet_resnet50_config
import prunax_scenic.configs.imagenet_vit_b16_config
assert trainers.ALL_TRAINERS == before, trainers.ALL_TRAINERS
print('unchanged', sorted(before))
"""


def test_importing_a_config_file_changes_no_trainer():
  run = subprocess.run(
    [sys.executable, '-c', _IMPORT_CONFIG], capture_output=True, text=True, timeout=300, check=False
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "unchanged ['classification_trainer', 'transfer_trainer']" in run.stdout

"""prunax in real t5x training: ``python -m t5x.train`` with the tiny gin file shipped in
prunax_t5x, on one CPU device and partitioned on 8 (4-way data x 2-way model parallel)."""

import glob
import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import prunax
from tests.xla_env import cpu_env

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec('t5x') is None, reason='t5x is not installed'
)

TINY_GIN = 'prunax_t5x/configs/t5_1_1_tiny_offline.gin'
TRAIN_STEPS = 8
# The tiny gin file saves checkpoints at steps 0, 4 and 8.
CONFIG = {
  'sparsity': 0.8,
  'dist_type': 'erk',
  'update_freq': 2,
  'update_start_step': 0,
  'update_end_step': 6,
}


def _train(
  model_dir,
  algorithm: str,
  devices: int = 1,
  steps: int = TRAIN_STEPS,
  gin_file: str = TINY_GIN,
  extra: tuple = (),
) -> None:
  bindings = {
    'MODEL_DIR': repr(str(model_dir)),
    'TRAIN_STEPS': steps,
    'prunax_t5x.pruned_optax.algorithm': repr(algorithm),
    # t5x restarts the data set on a relaunch unless its iterator is checkpointed.
    'utils.SaveCheckpointConfig.save_dataset': True,
  }
  bindings.update({f'prunax_t5x.pruned_optax.{k}': repr(v) for k, v in CONFIG.items()})
  bindings.update(dict(extra))
  if devices > 1:  # t5x's CPU mesh is all 'model' unless a model-parallel submesh is given
    bindings['partitioning.PjitPartitioner.num_partitions'] = None
    bindings['partitioning.PjitPartitioner.model_parallel_submesh'] = (1, 1, 1, 2)
  cmd = [sys.executable, '-m', 't5x.train', f'--gin_file={gin_file}']
  cmd += [f'--gin.{k}={v}' for k, v in bindings.items()]
  env = cpu_env(devices)
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-4000:]


def _load(model_dir, step: int) -> dict:
  """The saved train state as a flat {'target/...': np.ndarray or None} dict."""
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util

  path = os.path.join(model_dir, f'checkpoint_{step}', 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', metadata)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return traverse_util.flatten_dict(checkpointer.restore(path, restore_args=args), sep='/')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  cache = {}

  def get(algorithm: str, devices: int = 1, gin_file: str = TINY_GIN, extra: tuple = ()) -> str:
    key = (algorithm, devices, gin_file, repr(extra))  # extra may hold dicts
    if key not in cache:
      model_dir = str(tmp_path_factory.mktemp(f'{algorithm}_{devices}dev'))
      _train(model_dir, algorithm, devices, gin_file=gin_file, extra=extra)
      cache[key] = model_dir
    return cache[key]

  return get


def _pruned(state: dict) -> dict:
  """{param name: (param, mask)} for the pruned params of a flat train state."""
  masks = {
    k[len('state/param_states/masks/') :]: v
    for k, v in state.items()
    if k.startswith('state/param_states/masks/') and v is not None
  }
  out = {}
  for name, mask in masks.items():
    param = state['target/' + name]
    # Stored 1 bit per weight, packed along the last axis in gcd(d, 8) byte blocks (the
    # default; one block when the blocks would hold a multiple of 8 weights), or one uint8
    # per weight. A last axis of 8 packs one weight per byte, in the param's shape.
    d = param.shape[-1]
    blocks = math.gcd(d, 8) if (d // math.gcd(d, 8)) % 8 else 1
    packed = (*param.shape[:-1], blocks * -(-(d // blocks) // 8))
    assert mask.dtype == np.uint8 and mask.shape in (packed, param.shape), name
    out[name] = (param, np.asarray(prunax.unpack_masks({'m': mask}, {'m': param})['m']))
  return out


def _expected_zeros(
  algorithm: str, state: dict, step: int, layer_axes=None, custom_sparsity_map=None
) -> dict:
  """{param name: number of pruned weights} that the schedule prescribes after ``step``
  (per layer of a stacked param when ``layer_axes`` gives its layer axis)."""
  extra = {'extra': {'layer_axes': layer_axes}} if layer_axes else {}
  if custom_sparsity_map:
    extra['custom_sparsity_map'] = custom_sparsity_map
  updater = prunax.create_updater_from_config({'algorithm': algorithm, **CONFIG, **extra})
  params = {k: p for k, (p, _) in _pruned(state).items()}
  params.update({k: state['target/' + k] for k in custom_sparsity_map or {}})
  targets = updater.target_sparsities(params)
  layers = {
    k: next((p.shape[a] for r, a in (layer_axes or {}).items() if re.fullmatch(r, k)), 1)
    for k, p in params.items()
  }
  return {
    k: int(
      prunax.sparsity_types.num_zeros(
        float(updater.scheduler.sparsity(step - 1, t)), params[k].size // layers[k]
      )
    )
    for k, t in targets.items()
    if t is not None
  }


@pytest.mark.parametrize('step', [4, 8])
def test_magnitude_checkpoints_follow_the_schedule(runs, step):
  state = _load(runs('magnitude'), step)
  expected = _expected_zeros('magnitude', state, step)
  assert len(expected) == 40  # every 2-D kernel and embedding of the tiny T5
  for name, (param, mask) in _pruned(state).items():
    assert np.sum(mask == 0) == expected[name], name
    assert np.sum(param == 0) == expected[name], name  # zero exactly where pruned
  total = sum(expected.values()) / sum(p.size for p, _ in _pruned(state).values())
  assert total == pytest.approx({4: 0.8 * (1 - (2 / 3) ** 3), 8: 0.8}[step], abs=2e-3)
  assert state['state/param_states/count'] == step


def test_ste_keeps_dense_weights_and_saves_sparse_params(runs):
  state = _load(runs('magnitude_ste'), TRAIN_STEPS)
  expected = _expected_zeros('magnitude_ste', state, TRAIN_STEPS)
  for name, (param, mask) in _pruned(state).items():
    dense = state['state/param_states/algorithm_state/dense_params/' + name]
    assert np.sum(mask == 0) == expected[name], name
    np.testing.assert_array_equal(param, np.where(mask, dense, 0.0))
    assert np.all(dense != 0), name  # the pruned weights live on in the dense copy


def test_rigl_moves_connections_at_constant_sparsity(runs):
  model_dir = runs('rigl')
  start, end = _load(model_dir, 0), _load(model_dir, TRAIN_STEPS)
  expected = _expected_zeros('rigl', end, TRAIN_STEPS)
  moved = 0
  for name, (param, mask) in _pruned(end).items():
    assert np.sum(mask == 0) == expected[name], name
    assert np.all(param[mask == 0] == 0), name
    assert np.sum(_pruned(start)[name][1] == 0) == expected[name], name
    moved += int(np.sum(mask != _pruned(start)[name][1]))
  assert moved > 0


def _partition_specs(model_dir) -> dict:
  """{variable name: partition spec} from the model-info.txt t5x writes."""
  with open(os.path.join(model_dir, 'model-info.txt')) as f:
    return dict(re.findall(r'Variable (\S+)\s+size .* partition spec (.*)', f.read()))


def test_partitioned_run_matches_one_device(runs):
  one, eight = runs('magnitude_ste'), runs('magnitude_ste', devices=8)
  specs = _partition_specs(eight)
  # Params are listed by name, the optimizer state under 'param_states/'.
  model_parallel = [
    k for k, v in specs.items() if not k.startswith('param_states/') and 'model' in v
  ]
  assert len(model_parallel) >= 40
  for param in model_parallel:  # the pruner's state shards exactly like the params
    assert specs['param_states/masks/' + param] == specs[param], param
    assert specs['param_states/algorithm_state/dense_params/' + param] == specs[param], param
  assert specs['param_states/count'] == specs['param_states/rng'] == 'None'
  a, b = _load(one, TRAIN_STEPS), _load(eight, TRAIN_STEPS)
  assert a.keys() == b.keys()
  for key in a:
    if a[key] is None or '/masks/' in key or a[key].dtype.kind != 'f':
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    else:
      # Data-parallel sums reduce in another order: Adam's moments differ by ~6e-4 relative.
      np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=key)


def test_set_keeps_exact_sparsity(runs):
  state = _load(runs('set'), TRAIN_STEPS)
  expected = _expected_zeros('set', state, TRAIN_STEPS)
  for name, (param, mask) in _pruned(state).items():
    assert np.sum(mask == 0) == expected[name], name
    assert np.all(param[mask == 0] == 0), name


def test_autosparse_saves_soft_thresholded_params(runs):
  state = _load(runs('autosparse'), TRAIN_STEPS)
  pruned = _pruned(state)
  assert pruned
  for name, (param, mask) in pruned.items():
    dense = state['state/param_states/algorithm_state/dense_params/' + name]
    s = state['state/param_states/algorithm_state/thresholds/' + name]
    threshold = 1.0 / (1.0 + np.exp(-np.float32(s)))
    expected = np.sign(dense) * np.maximum(np.abs(dense) - threshold, 0.0)
    np.testing.assert_allclose(param, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(mask == 1, np.abs(dense) > threshold)


def _summaries(model_dir) -> dict:
  """{tag: {step: value}} of the train summaries t5x wrote (TensorBoard event files)."""
  import tensorflow as tf

  out = {}
  for path in glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if array.dtype.kind == 'f' and array.size == 1:  # Scalars (not the gin config text).
          out.setdefault(value.tag, {})[event.step] = float(array)
  return out


def test_sparsity_in_train_summaries(runs):
  model_dir = runs('magnitude')
  scalars = _summaries(model_dir)
  state = _load(model_dir, TRAIN_STEPS)
  kernels = {
    k[len('target/') :]: v
    for k, v in state.items()
    if k.startswith('target/') and v is not None and v.ndim >= 2
  }
  size = sum(v.size for v in kernels.values())
  # t5x averages train metrics over the steps since the previous summary: the summaries at
  # steps 4 and 8 (the tiny gin's period) cover steps 1-4 and 5-8. Magnitude pruning zeroes
  # exactly the scheduled number of weights per kernel after every step.
  assert set(scalars['sparsity/total']) == {4, TRAIN_STEPS}
  for summary_step in (4, TRAIN_STEPS):
    per_step = [
      _expected_zeros('magnitude', state, step)
      for step in range(summary_step - 3, summary_step + 1)
    ]
    total = np.mean([sum(zeros.values()) for zeros in per_step]) / size
    assert scalars['sparsity/total'][summary_step] == pytest.approx(total, abs=1e-6)
    assert scalars['sparsity/scheduled_total'][summary_step] == pytest.approx(total, abs=1e-6)
    for name in per_step[0]:
      assert scalars[f'sparsity/{name}'][summary_step] == pytest.approx(
        np.mean([zeros[name] for zeros in per_step]) / kernels[name].size, abs=1e-6
      ), name
  assert scalars['sparsity/total'][4] < scalars['sparsity/total'][TRAIN_STEPS]


def test_rigl_checkpoint_0_holds_sparse_params(runs):
  state = _load(runs('rigl'), 0)
  for name, (param, mask) in _pruned(state).items():
    assert np.sum(mask == 0) > 0, name
    assert np.all(param[mask == 0] == 0), name


RESUMED = ['magnitude', 'rigl', 'set', 'magnitude_ste', 'autosparse']


@pytest.mark.parametrize('algorithm', RESUMED)
def test_relaunch_into_model_dir_matches_uninterrupted_run(runs, tmp_path, algorithm):
  """TRAIN_STEPS // 2 steps, the same command to TRAIN_STEPS, vs TRAIN_STEPS in one launch."""
  _train(tmp_path, algorithm, steps=TRAIN_STEPS // 2)
  _train(tmp_path, algorithm)  # t5x restores checkpoint 4 and trains steps 5 to 8.
  resumed, whole = _load(tmp_path, TRAIN_STEPS), _load(runs(algorithm), TRAIN_STEPS)
  assert resumed.keys() == whole.keys()
  # Integer state is integer again after t5x's restore (it reads it back as float32).
  assert resumed['state/param_states/count'].dtype == np.int32
  assert resumed['state/param_states/count'] == TRAIN_STEPS
  assert resumed['state/param_states/rng'].dtype == np.uint32
  for key in resumed:
    assert getattr(resumed[key], 'dtype', None) == getattr(whole[key], 'dtype', None), key
    if resumed[key] is None or resumed[key].dtype.kind != 'f':
      np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)  # masks, count, rng
    else:
      np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)


# optax.adafactor with the settings of t5x's own Adafactor for T5, as the README binds it
# (the equivalence is checked against t5x's optimizer in test_t5x_adafactor.py). It is a gin
# file: t5x parses --gin bindings without the file's `import optax`, so a binding cannot
# reach an optax function that no gin file binds ("No configurable matching").
ADAFACTOR_GIN = f"""from __gin__ import dynamic_registration
import optax
import prunax_t5x

include '{TINY_GIN}'

prunax_t5x.pruned_optax.optimizer = @optax.adafactor()
optax.adafactor:
  learning_rate = 1e-2
  decay_rate = 0.8
  momentum = None
  clipping_threshold = 1.0
  multiply_by_parameter_scale = True
  min_dim_size_to_factor = 128
  eps = 1e-30
"""


def test_adafactor_launch_prunes_on_schedule(tmp_path):
  # Parameter names as the pruner sees them in t5x: no 'params/' prefix.
  dense = {'token_embedder/embedding': 0.0}
  gin_file = tmp_path / 'adafactor.gin'
  gin_file.write_text(ADAFACTOR_GIN)
  model_dir = tmp_path / 'run'
  _train(
    model_dir,
    'magnitude',
    gin_file=str(gin_file),
    extra=(('prunax_t5x.pruned_optax.custom_sparsity_map', dense),),
  )
  for step in (4, TRAIN_STEPS):
    state = _load(model_dir, step)
    expected = _expected_zeros('magnitude', state, step, custom_sparsity_map=dense)
    # Every 2-D kernel and the embedding, which custom_sparsity_map keeps at 0 zeros.
    assert len(expected) == 40 and expected['token_embedder/embedding'] == 0
    assert np.all(state['target/token_embedder/embedding'] != 0)
    for name, (param, mask) in _pruned(state).items():
      assert np.sum(mask == 0) == np.sum(param == 0) == expected[name], name
  # Adafactor's state (no Adam moments): factored rows and columns of the 384 x 8 embedding
  # are not factored (8 < 128), so every leaf holds a full second moment 'v'.
  assert any('/v/' in k for k in state) and not any('/mu/' in k for k in state)
  moved = _load(model_dir, 0)['target/token_embedder/embedding']
  assert not np.allclose(moved, state['target/token_embedder/embedding'])


SCANNED_GIN = 'prunax_t5x/configs/t5_1_1_tiny_scanned_offline.gin'
# The layer_axes binding of the scanned gin file: layer axis 1 in the stacked params.
SCANNED_LAYER_AXES = {'(.*/)?(encoder/encoder|decoder/decoder)/.*': 1}


def _stacked(name: str) -> bool:
  return name.startswith(('encoder/encoder/', 'decoder/decoder/'))


def test_scanned_model_prunes_each_layer_and_partitions_like_one_device(runs):
  """t5x's scalable_t5 T5.1.1 with scan_layers, on 1 device and on 8 (4 x 2 mesh)."""
  one, eight = runs('magnitude', gin_file=SCANNED_GIN), runs('magnitude', 8, SCANNED_GIN)
  state = _load(one, TRAIN_STEPS)
  pruned = _pruned(state)
  stacked = [k for k in pruned if _stacked(k)]
  assert len(stacked) >= 20  # attention, mlp and relative-position kernels of both stacks
  per_layer = _expected_zeros('magnitude', state, TRAIN_STEPS, SCANNED_LAYER_AXES)
  for name, (param, mask) in pruned.items():
    if _stacked(name):  # each of the 2 layers is at its own target
      for layer in range(param.shape[1]):
        assert np.sum(mask[:, layer] == 0) == per_layer[name], (name, layer)
        assert np.sum(param[:, layer] == 0) == per_layer[name], (name, layer)
    else:
      assert np.sum(mask == 0) == np.sum(param == 0) == per_layer[name], name
  specs = _partition_specs(eight)
  model_parallel = [k for k in specs if _stacked(k) and 'model' in specs[k]]
  assert len(model_parallel) >= 20
  for param in model_parallel:
    if 'param_states/masks/' + param in specs:
      assert specs['param_states/masks/' + param] == specs[param], param
  a, b = state, _load(eight, TRAIN_STEPS)
  assert a.keys() == b.keys()
  for key in a:
    if a[key] is None or '/masks/' in key or a[key].dtype.kind != 'f':
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    else:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=key)

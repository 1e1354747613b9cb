"""prunax_t5x.oneshot: prune a t5x-format checkpoint, write it back, fine-tune on its masks.

The first tests use a checkpoint in t5x's layout (Orbax tree with ``target`` and ``state``)
and a model with t5x's ``_compute_logits``, without t5x; the last runs real t5x and is
skipped where t5x is not installed."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax_t5x
from prunax_t5x import oneshot


class _Decoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 8)(tokens)
    x = x + nn.Dense(8)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(16)(x)


class _Model:
  """The part of a t5x model that one-shot pruning uses."""

  module = _Decoder()

  def _compute_logits(self, params, batch, dropout_rng=None):
    del dropout_rng
    return self.module.apply({'params': params}, batch['decoder_input_tokens'])


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  model = _Model()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 16)
  params = model.module.init(jax.random.PRNGKey(0), tokens)['params']
  state = {
    'target': jax.tree.map(np.asarray, params),
    'state': {'step': np.asarray(7), 'param_states': {'count': np.asarray(7)}},
  }
  root = str(tmp_path_factory.mktemp('t5x'))
  return model, oneshot.write_checkpoint(state, root, 7), params, tokens


def test_prune_checkpoint_writes_pruned_target_and_masks(checkpoint, tmp_path):
  model, checkpoint_dir, params, tokens = checkpoint
  batches = [{'decoder_input_tokens': tokens}]
  result = oneshot.prune_checkpoint(
    model, checkpoint_dir, batches, str(tmp_path), method='wanda', sparsity_type='2:4'
  )
  assert [r.layer for r in result.table] == ['Dense_1/kernel', 'Dense_0/kernel', 'Dense_2/kernel']
  written = oneshot.read_checkpoint(str(tmp_path / 'checkpoint_7'))
  assert int(written['state']['step']) == 7  # the rest of the tree is copied
  for a, b in zip(jax.tree.leaves(written['target']), jax.tree.leaves(result.params)):
    np.testing.assert_array_equal(a, b)
  masks = oneshot.load_masks(str(tmp_path / 'masks.npz'))
  assert masks['Embed_0']['embedding'] is None and masks['Dense_0']['bias'] is None
  assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
    result.masks, is_leaf=lambda x: x is None
  )
  kernel_mask = masks['Dense_0']['kernel']
  assert (kernel_mask.reshape(8, 4, 8).sum(axis=1) == 2).all()  # 2:4 along the input
  assert (tmp_path / 'table.md').read_text().startswith('| layer |')
  # The masks drive fixed-mask fine-tuning, as gin builds it for t5x.
  gin.clear_config()
  try:
    gin.parse_config(
      'from __gin__ import dynamic_registration\nimport optax\nimport prunax_t5x\n'
      'import prunax_t5x.oneshot\n'
      'prunax_t5x.pruned_optax.optimizer = @optax.sgd()\noptax.sgd.learning_rate = 0.1\n'
      "prunax_t5x.pruned_optax.algorithm = 'fixed_masks'\n"
      'prunax_t5x.pruned_optax.sparsity = 0.0\n'
      "prunax_t5x.pruned_optax.extra = {'masks': @prunax_t5x.oneshot.load_masks()}\n"
      f"prunax_t5x.oneshot.load_masks.path = '{tmp_path / 'masks.npz'}'\n"
    )
    tx = prunax_t5x.pruned_optax()
  finally:
    gin.clear_config()
  p = jax.tree.map(jnp.asarray, written['target'])
  grads = jax.grad(lambda p: jnp.sum(model._compute_logits(p, batches[0]) ** 2))(p)
  updates, _ = tx.update(grads, tx.init(p), p)
  new = optax.apply_updates(p, updates)
  assert float(jnp.mean(new['Dense_0']['kernel'] == 0)) == 0.5
  assert bool(jnp.all(jnp.where(kernel_mask, True, new['Dense_0']['kernel'] == 0)))


def test_errors_name_the_problem(checkpoint, tmp_path):
  model, _, _, _ = checkpoint
  with pytest.raises(FileNotFoundError, match='no "state" directory'):
    oneshot.prune_checkpoint(model, str(tmp_path), [], str(tmp_path / 'out'))
  np.savez(tmp_path / 'other.npz', a=np.ones(2))
  with pytest.raises(ValueError, match='not written by prunax_t5x.oneshot'):
    oneshot.load_masks(str(tmp_path / 'other.npz'))


@pytest.mark.skipif(
  importlib.util.find_spec('t5x') is None,
  reason='t5x is not installed: the real-t5x round trip (train, prune, fine-tune) cannot run',
)
def test_real_t5x_train_prune_fine_tune_and_eval(tmp_path):
  """Train the tiny T5 for 2 steps with t5x.train, prune its checkpoint through t5x's model,
  fine-tune on the masks with t5x.train, and evaluate the pruned checkpoint with t5x.eval."""
  from t5x import gin_utils

  tiny = 'prunax_t5x/configs/t5_1_1_tiny_offline.gin'
  model_gin = 'prunax_t5x/configs/t5_1_1_tiny_model.gin'
  env = dict(os.environ, JAX_PLATFORMS='cpu')

  def launch(script, *flags):
    cmd = [sys.executable, '-m', script, *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

  def train(model_dir, steps, *flags):
    launch(
      't5x.train',
      f'--gin_file={tiny}',
      *flags,
      f"--gin.MODEL_DIR='{model_dir}'",
      f'--gin.TRAIN_STEPS={steps}',
    )

  dense_dir = tmp_path / 'dense'
  train(dense_dir, 2, "--gin.prunax_t5x.pruned_optax.algorithm='no_prune'")
  gin.clear_config()
  search = ['.', os.path.dirname(os.path.dirname(prunax_t5x.__file__))]
  # The model's gin alone: the run's gin names t5x.train's script module (__main__).
  bindings = ['import prunax_t5x.oneshot', 'prunax_t5x.oneshot.configured_model.model = %MODEL']
  gin_utils.parse_gin_flags(search, [model_gin], bindings)
  model = oneshot.configured_model()
  gin.clear_config()
  tokens = np.random.default_rng(0).integers(3, 259, (4, 16)).astype(np.int32)
  batch = {
    'encoder_input_tokens': tokens,
    'decoder_input_tokens': np.roll(tokens, 1, axis=1),
    'decoder_target_tokens': tokens,
  }
  pruned_dir = tmp_path / 'pruned'
  result = oneshot.prune_checkpoint(
    model, str(dense_dir / 'checkpoint_2'), [batch], str(pruned_dir), sparsity=0.5
  )
  assert result.table and all(abs(r.sparsity - 0.5) < 0.02 for r in result.table)
  masks = oneshot.load_masks(str(pruned_dir / 'masks.npz'))
  pruned = oneshot.read_checkpoint(str(pruned_dir / 'checkpoint_2'))['target']

  # Fine-tune on the fixed masks: pruned weights stay 0, kept ones train.
  train(
    tmp_path / 'finetune',
    4,
    '--gin_file=prunax_t5x/configs/finetune_oneshot.gin',
    f"--gin.prunax_t5x.oneshot.load_masks.path='{pruned_dir / 'masks.npz'}'",
    f"--gin.utils.RestoreCheckpointConfig.path='{pruned_dir / 'checkpoint_2'}'",
  )
  tuned = oneshot.read_checkpoint(str(tmp_path / 'finetune' / 'checkpoint_4'))['target']
  name = 'decoder/layers_0/mlp/wi_0/kernel'.split('/')
  pick = lambda tree: functools.reduce(lambda t, k: t[k], name, tree)  # noqa: E731
  mask, before, after = pick(masks), np.asarray(pick(pruned)), np.asarray(pick(tuned))
  assert mask.mean() == 0.5
  assert (after[~mask] == 0).all() and (before[~mask] == 0).all()
  assert not np.array_equal(after[mask], before[mask])

  # t5x's eval restores the pruned checkpoint (params only) and decodes with it.
  out = tmp_path / 'eval'
  launch(
    't5x.eval',
    f'--gin_file={model_gin}',
    '--gin_file=t5x/configs/runs/eval.gin',
    '--gin.MIXTURE_OR_TASK_MODULE="prunax_t5x.tasks"',
    "--gin.MIXTURE_OR_TASK_NAME='prunax_tiny_corpus'",
    f"--gin.CHECKPOINT_PATH='{pruned_dir / 'checkpoint_2'}'",
    f"--gin.EVAL_OUTPUT_DIR='{out}'",
    "--gin.utils.DatasetConfig.split='validation'",
    '--gin.utils.DatasetConfig.batch_size=8',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
  )
  metrics = json.loads((out / 'inference_eval' / 'prunax_tiny_corpus-metrics.jsonl').read_text())
  assert metrics['step'] == 2 and 0.0 <= metrics['exact_match'] <= 1.0

"""The README's Python examples run in order (small params and gradients defined first)."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import prunax

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)


def test_readme_examples_run_and_do_what_they_say():
  assert len(BLOCKS) >= 2
  params = {
    'Dense_0': {
      'kernel': jax.random.normal(jax.random.PRNGKey(0), (32, 64)),
      'bias': jnp.zeros(64),
    },
    'Dense_1': {'kernel': jax.random.normal(jax.random.PRNGKey(1), (64, 8)), 'bias': jnp.zeros(8)},
  }

  class MLP(nn.Module):  # the params above are this model's
    @nn.compact
    def __call__(self, x):
      hidden = nn.Dense(64)(x)  # Dense_0
      return nn.Dense(8)(nn.relu(hidden))  # Dense_1

  batches = [jax.random.normal(jax.random.PRNGKey(2), (16, 32))]
  namespace = {
    'params': params,
    'grads': jax.tree.map(jnp.ones_like, params),
    'model': MLP(),
    'batches': batches,
  }
  for index, block in enumerate(BLOCKS):
    exec(compile(block, f'README.md example {index}', 'exec'), namespace)  # noqa: S102
    if index == 0:  # "params are 80% sparse, ERK-distributed"
      prunax = namespace['prunax']
      masks = prunax.bool_masks(namespace['opt_state'], namespace['params'])
      summary = prunax.summarize_sparsity(masks)
      assert summary['total_sparsity'] == pytest.approx(0.8, abs=0.01)
      erk = prunax.sparsity_distributions.erk(params, 0.8)
      for name in ('Dense_0', 'Dense_1'):
        assert summary[f'sparsity/{name}/kernel'] == pytest.approx(erk[name]['kernel'], abs=0.01)
        kernel = namespace['params'][name]['kernel']
        assert not jnp.any(jnp.where(masks[name]['kernel'], 0, kernel))
    if index == 1:  # "2:4 sparsity is 1 - n/m = 0.5 on every pruned leaf"
      _check_nm_pruner(namespace['nm_pruner'], params)


def _check_nm_pruner(nm_pruner, params):
  """The README's 2:4 pruner: dense until its schedule's sparsity is above 0, then 2:4.

  Its polynomial schedule gives sparsity 0 at the first update step (1000), so the masks switch
  to 2 of every 4 weights along each kernel's input axis (axis 0) at the next one (1100).
  """
  tx = nm_pruner.wrap_optax(optax.sgd(0.0))
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for count, kept_per_group in ((1000, 4), (1100, 2)):
    state = tx.init(params)
    state = state._replace(count=jnp.int32(count))
    _, state = update(grads, state, params)
    masks = prunax.bool_masks(state, params)
    for name in ('Dense_0', 'Dense_1'):
      mask = masks[name]['kernel']
      groups = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(axis=1)
      assert (groups == kept_per_group).all(), (count, name)

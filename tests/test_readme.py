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
    if 'ema_state' in namespace and 'ema_checked' not in namespace:
      _check_ema_pruner(namespace)
      namespace['ema_checked'] = True
  assert 'ema_checked' in namespace, 'the README lost its algorithm-writing example'


def _check_ema_pruner(ns):
  """The README's algorithm with its own state: the EMA of |g| it keeps is the formula's,
  it is carried in SparseState.algorithm_state, and one threshold over both kernels keeps
  exactly half of their weights by |w| * EMA."""
  state = prunax.get_sparse_state(ns['ema_state'])
  assert type(state.algorithm_state).__name__ == 'GradEma'
  # Three steps of e <- 0.9 e + 0.1 |g| from 0 with |g| = 1: 1 - 0.9 ** 3.
  ema = state.algorithm_state.ema['Dense_0']['kernel']
  assert jnp.allclose(ema, 1 - 0.9**3)
  assert isinstance(state.algorithm_state.ema['Dense_0']['bias'], optax.MaskedNode)
  masks = prunax.bool_masks(ns['ema_state'], ns['ema_params'])
  kernels = [masks[n]['kernel'] for n in ('Dense_0', 'Dense_1')]
  total = sum(k.size for k in kernels)
  assert sum(int((~k).sum()) for k in kernels) == total // 2
  # The pruned weights are those of smallest |w| (EMA equal everywhere) over both layers,
  # from the weights of the mask-update step (the params after two sgd steps).
  seen = ns['params']
  scores = jnp.concatenate(
    [jnp.abs(seen[n]['kernel'] - 0.02).reshape(-1) for n in ('Dense_0', 'Dense_1')]
  )
  threshold = jnp.sort(scores)[total // 2]
  flat = jnp.concatenate([k.reshape(-1) for k in kernels])
  assert bool(jnp.all(jnp.where(scores > threshold, flat, True)))
  assert bool(jnp.all(jnp.where(scores < threshold, ~flat, True)))


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

"""Step temporaries of every algorithm against the dense step's.

The target of the performance work: a pruned train step needs no more temporaries than
the dense step plus its masks' bytes. XLA's CPU backend stores what a reduction reads
when it cannot fuse it (a plain float sum goes to a library kernel, an int32 sum of more
than 32 elements becomes a chain of reduce-windows, a reduction over an axis moved last
needs a transposed copy), so a step that sums or ranks something of the weights' size
in the wrong form holds an extra array of 4 bytes a weight. ``memory_analysis()`` is
deterministic for one jax/XLA version (``tests/test_xla_env.py``), unlike timings.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import prunax
from benchmarks import compile_time
from tests.xla_env import compile_as_users

SIZES = (256, 512, 512, 16)
BATCH = 32


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), len(SIZES) - 1)
  return {
    f'layer{i}': {'kernel': jax.random.normal(k, (a, b)) / a**0.5, 'bias': jnp.zeros(b)}
    for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:], strict=True))
  }


def _loss(params, x):
  for i in range(len(params)):
    x = jnp.tanh(x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias'])
  return jnp.mean(x**2)


def _temporaries(tx, params) -> int:
  x = jnp.ones((BATCH, SIZES[0]))

  def step(p, s):
    updates, s = tx.update(jax.grad(_loss)(p, x), s, p)
    return optax.apply_updates(p, updates), s

  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params))
  return compile_as_users(lowered).memory_analysis().temp_size_in_bytes


@pytest.fixture(scope='module')
def dense_temporaries():
  return _temporaries(optax.adam(1e-3), _params())


@pytest.mark.parametrize('name', compile_time.buildable())
def test_a_step_needs_the_dense_temporaries_and_its_masks(name, dense_temporaries):
  params = _params()
  tx = compile_time.updater(name).wrap_optax(optax.adam(1e-3))
  masks = prunax.get_sparse_state(tx.init(params)).masks
  mask_bytes = sum(m.nbytes for m in jax.tree.leaves(masks))
  # Slack for the selection's per-row counts (1/32 of the keys) and small vectors: a
  # quarter of the largest weight's float32 bytes, where a stored sum or rank input is
  # all of them.
  slack = SIZES[1] * SIZES[2] * 4 // 4
  got = _temporaries(tx, params)
  assert got <= dense_temporaries + mask_bytes + slack, (
    f'{name}: {got} temporary bytes, dense {dense_temporaries}, masks {mask_bytes}'
  )

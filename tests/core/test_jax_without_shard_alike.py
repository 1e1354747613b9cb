"""prunax on a jax without ``jax.experimental.shard_alike`` (jax 0.11 removed it).

The pinned jax has it; a lent GPU machine with jax 0.11.2 could not import prunax at all
(``masks.py`` imported it unconditionally). In a subprocess whose imports of that module
fail, prunax imports, and a jitted packed-mask training step stores the same masks as
here, where it constrains them with ``shard_alike``.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

STEP = """
import jax, jax.numpy as jnp, numpy as np, optax, prunax
params = {'w': jax.random.normal(jax.random.PRNGKey(0), (64, 96)), 'b': jnp.zeros(96)}
tx = prunax.MagnitudePruning(sparsity=0.75, packed_masks=True).wrap_optax(optax.sgd(0.1))
state = tx.init(params)
@jax.jit
def step(p, s):
  g = jax.grad(lambda p: jnp.sum(jnp.tanh(jnp.ones((4, 64)) @ p['w'] + p['b']) ** 2))(p)
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s
for _ in range(3):
  params, state = step(params, state)
masks = prunax.get_sparse_state(state).masks
"""

BLOCK = """
import importlib.abc, sys
class NoShardAlike(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == 'jax.experimental.shard_alike':
      raise ImportError('no module named jax.experimental.shard_alike (as in jax 0.11)')
sys.meta_path.insert(0, NoShardAlike())
"""


def test_prunax_trains_on_a_jax_without_shard_alike(tmp_path):
  namespace = {}
  exec(STEP, namespace)  # noqa: S102 - the same step here, with shard_alike
  want = np.asarray(namespace['masks']['w'])
  assert namespace['masks']['w'].dtype == jnp.uint8 and want.shape != (64, 96)  # packed
  code = (
    BLOCK
    + STEP
    + """
from prunax import masks as masks_lib
assert masks_lib.shard_alike is None
np.save(sys.argv[1], np.asarray(masks['w']))
"""
  )
  out = tmp_path / 'masks.npy'
  run = subprocess.run(
    [sys.executable, '-c', code, str(out)], capture_output=True, text=True, check=False
  )
  assert run.returncode == 0, run.stderr[-3000:]
  np.testing.assert_array_equal(np.load(out), want)

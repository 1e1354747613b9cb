"""Every algorithm compiles and trains under the XLA flags users run with.

The suite compiles with XLA's older CPU fusion emitters (``tests/xla_env.py``, for its
speed); users' processes use the new ones, whose passes differ. A random initial mask of
a one-weight leaf compiled under the suite's flags and failed under the users' (XLA's
simplifier looped on the permutation's rounds modulo 1). This child runs the init and
three steps (mask updates at steps 1, 2 and 3) of every registered algorithm that
builds from a plain config, on leaves of awkward shapes (one weight, odd sizes, a
stacked leaf), with the users' emitters, and reports each pruned leaf's kept count.
"""

import numpy as np

from tests import xla_env

SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np, optax, prunax

OTHERS = {'a': jnp.ones((1, 1)), 'b': jnp.ones((3, 5)), 'c': jnp.ones((8, 32)),
          'stack': {'kernel': jnp.ones((2, 8, 12))}}
NM = {'c': jnp.ones((8, 32)), 'd': jnp.ones((16, 4))}  # N:M groups along the input axis
out = {}
for name in prunax.all_algorithm_names():
  nm = name in ('nm_rigl', 'nm_set', 'sr_ste')
  config = {'algorithm': name, 'sparsity': 0.5 if nm else 0.8, 'update_freq': 1,
            'update_start_step': 1, 'update_end_step': 4}
  if not nm:
    config['layer_axes'] = {'stack/kernel': 0}
  try:
    updater = prunax.create_updater_from_config(config)
  except ValueError as e:  # needs more than a config (masks, loss_fn, ...)
    out[name] = str(e)[:60]
    continue
  params = jax.tree.map(
    lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), NM if nm else OTHERS)
  tx = updater.wrap_optax(optax.adam(1e-2))

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: sum(jnp.sum(jnp.sin(3 * w)) for w in jax.tree.leaves(p)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  s = tx.init(params)
  for _ in range(4):
    params, s = step(params, s)
  masks = prunax.state.bool_masks(s, params)
  out[name] = {
    '/'.join(str(getattr(k, 'key', k)) for k in path): int(np.sum(np.asarray(m)))
    for path, m in jax.tree_util.tree_leaves_with_path(masks)
  }
  out[name]['finite'] = bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)))
print('REPORT' + json.dumps(out))
"""


def test_every_algorithm_compiles_and_trains_with_the_users_flags():
  report = xla_env.child_report(SCRIPT, xla_env.cpu_env(1, users_emitters=True), timeout=600)
  ran = {name: r for name, r in report.items() if isinstance(r, dict)}
  # The ones a plain config cannot build say so (masks, loss_fn, alpha).
  assert set(report) - set(ran) == {'fixed_masks', 'grasp', 'snip', 'synflow', 'topkast_ga'}
  assert len(ran) >= 16, sorted(ran)
  for name, kept in ran.items():
    assert kept.pop('finite'), name
    if not name.startswith('global_'):  # one global threshold may empty a leaf
      for leaf, count in kept.items():
        assert count >= 1, (name, leaf)  # a pruned leaf keeps at least one weight
    if name in ('static_sparse', 'set', 'rigl', 'mest'):
      # Sparse training keeps its counts (SNFS redistributes them across leaves): 80% of
      # each leaf, per layer of the stack.
      assert kept['a'] == 1 and kept['c'] == 256 - int(np.round(np.float32(0.8) * 256)), name
      assert kept['stack/kernel'] == 2 * (96 - int(np.round(np.float32(0.8) * 96))), name

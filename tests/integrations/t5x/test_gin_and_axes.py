"""prunax_t5x without t5x: the gin factory and the logical axes of the pruner's state."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import prunax
import prunax_t5x

PARAMS = {
  'encoder': {
    'mlp': {'wi': jnp.arange(1.0, 129.0).reshape(8, 16)},
    'norm': {'scale': jnp.ones(8)},
  },
  'token_embedder': {'embedding': jnp.linspace(-1.0, 1.0, 96).reshape(12, 8)},
}
AXES = {
  'encoder': {'mlp': {'wi': P('embed', 'mlp')}, 'norm': {'scale': P('embed')}},
  'token_embedder': {'embedding': P('vocab', 'embed')},
}


def _parse(bindings: str) -> optax.GradientTransformationExtraArgs:
  gin.clear_config()
  gin.parse_config(
    'from __gin__ import dynamic_registration\nimport optax\nimport prunax_t5x\n' + bindings
  )
  return prunax_t5x.pruned_optax()


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def test_gin_builds_pruned_adam_that_reaches_the_target():
  tx = _parse("""
prunax_t5x.pruned_optax:
  optimizer = @optax.adam()
  algorithm = 'magnitude'
  sparsity = 0.75
  dist_type = 'uniform'
  update_freq = 1
  update_start_step = 0
  update_end_step = 2
optax.adam.learning_rate = 0.1
""")
  params = PARAMS
  state = tx.init(params)
  assert isinstance(state, prunax.SparseState)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  assert int(jnp.sum(params['encoder']['mlp']['wi'] == 0)) == 96  # 75% of 128
  assert int(jnp.sum(params['token_embedder']['embedding'] == 0)) == 72  # 75% of 96
  assert int(jnp.sum(params['encoder']['norm']['scale'] == 0)) == 0  # 1-D: not pruned
  assert isinstance(state.masks['encoder']['norm']['scale'], optax.MaskedNode)


@pytest.mark.parametrize(
  'algorithm',
  [
    'magnitude',
    'saliency',
    'random',
    'global_magnitude',
    'magnitude_ste',
    'static_sparse',
    'set',
    'rigl',
    'autosparse',
  ],
)
def test_every_family_builds_from_gin(algorithm):
  # Global pruning sets per-layer sparsities itself: it takes the uniform distribution.
  dist = 'uniform' if algorithm.startswith('global') else 'erk'
  tx = _parse(f"""
prunax_t5x.pruned_optax.optimizer = @optax.sgd()
prunax_t5x.pruned_optax.algorithm = '{algorithm}'
prunax_t5x.pruned_optax.dist_type = '{dist}'
prunax_t5x.pruned_optax.sparsity = 0.5
prunax_t5x.pruned_optax.update_freq = 2
prunax_t5x.pruned_optax.update_end_step = 4
optax.sgd.learning_rate = 0.1
""")
  state = tx.init(PARAMS)
  absent = lambda x: isinstance(x, optax.MaskedNode)
  assert (not absent(getattr(state.algorithm_state, 'dense_params', optax.MaskedNode()))) == (
    algorithm in ('magnitude_ste', 'autosparse')
  )
  assert (not absent(getattr(state.algorithm_state, 'thresholds', optax.MaskedNode()))) == (
    algorithm == 'autosparse'
  )


def test_bad_settings_name_the_value():
  with pytest.raises(ValueError, match="'prune_everything'"):
    _parse("""
prunax_t5x.pruned_optax.optimizer = @optax.sgd()
prunax_t5x.pruned_optax.algorithm = 'prune_everything'
prunax_t5x.pruned_optax.sparsity = 0.5
optax.sgd.learning_rate = 0.1
""")


@pytest.mark.parametrize('value', ['constant', 'cosine'])
def test_drop_fraction_fn_reaches_the_updater(value):
  tx = _parse(f"""
prunax_t5x.pruned_optax:
  optimizer = @optax.sgd()
  algorithm = 'rigl'
  sparsity = 0.5
  update_end_step = 10
  drop_fraction_fn = '{value}'
optax.sgd.learning_rate = 0.1
""")
  assert prunax.engines.updater_of(tx).drop_fraction_fn == value


@pytest.mark.parametrize(
  ('algorithm', 'value', 'message'),
  [('rigl', 'linear', "'linear'"), ('magnitude', 'constant', 'drop_fraction_fn applies only')],
)
def test_bad_drop_fraction_fn_names_the_value(algorithm, value, message):
  with pytest.raises(ValueError, match=message):
    prunax_t5x.pruned_optax(
      optax.sgd(0.1), algorithm, 0.5, update_end_step=10, drop_fraction_fn=value
    )


def _inner_marker(state, params_axes):
  del params_axes
  return jax.tree.map(lambda _: 'inner', state)


def _state(algorithm: str, packed_masks: bool = False):
  updater = prunax.create_updater_from_config(
    {
      'algorithm': algorithm,
      'sparsity': 0.5,
      'update_freq': 1,
      'update_end_step': 2,
      'packed_masks': packed_masks,
    }
  )
  return updater.wrap_optax(optax.adam(1e-3)).init(PARAMS)


@pytest.mark.parametrize('packed_masks', [False, True])
def test_masks_take_the_params_axes(packed_masks):
  state = _state('magnitude', packed_masks)
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, _inner_marker)
  assert isinstance(axes, prunax.SparseState)
  assert axes.masks == {
    'encoder': {'mlp': {'wi': P('embed', 'mlp')}, 'norm': {'scale': optax.MaskedNode()}},
    'token_embedder': {'embedding': P('vocab', 'embed')},
  }
  assert (axes.count, axes.rng) == (None, None)
  assert axes.algorithm_state == optax.MaskedNode()  # magnitude pruning keeps no state
  assert jax.tree.leaves(axes.inner_state) == ['inner'] * len(jax.tree.leaves(state.inner_state))
  # Every axes entry has the rank of its array, so it can be a sharding (packed: 8 blocks of
  # whole bytes along last axes of 16 and 8 weights, see prunax.pack_mask).
  shapes = [np.shape(m) for m in jax.tree.leaves(state.masks)]
  assert shapes == ([(8, 8), (12, 8)] if packed_masks else [(8, 16), (12, 8)])
  for mask, spec in zip(jax.tree.leaves(state.masks), jax.tree.leaves(axes.masks), strict=True):
    assert len(spec) == mask.ndim


def test_dense_weights_take_the_params_axes():
  axes = prunax_t5x.sparse_state_logical_axes(_state('magnitude_ste'), AXES, _inner_marker)
  assert axes.algorithm_state.dense_params == axes.masks
  assert axes.algorithm_state.dense_params['encoder']['mlp']['wi'] == P('embed', 'mlp')


def test_params_like_algorithm_state_takes_the_params_axes():
  # SNFS's gradient momentum is declared params_like by its state class: it shards like
  # the weights (a state class of a new algorithm needs no change here).
  state = _state('snfs')
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, _inner_marker)
  assert type(axes.algorithm_state).__name__ == 'SnfsState'
  assert axes.algorithm_state.momentum['encoder']['mlp']['wi'] == P('embed', 'mlp')
  assert axes.algorithm_state.momentum['token_embedder']['embedding'] == P('vocab', 'embed')


def test_thresholds_and_their_optimizer_state_are_replicated():
  state = _state('autosparse')
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, _inner_marker)
  assert axes.algorithm_state.dense_params == axes.masks
  # Adam's moments of each pruned leaf's threshold (0-d) and its count: one replicated
  # entry per array (none for the unpruned norm scale).
  leaves = jax.tree.leaves(state.algorithm_state.threshold_state)
  assert len(jax.tree.leaves(state.algorithm_state.thresholds)) == 2
  assert len(leaves) == 1 + 2 * 2
  assert jax.tree.structure(axes.algorithm_state.threshold_state, is_leaf=lambda x: x is None) == (
    jax.tree.structure(state.algorithm_state.threshold_state)
  )
  assert jax.tree.leaves(axes.algorithm_state.threshold_state, is_leaf=lambda x: x is None) == [
    None
  ] * len(leaves)


def test_chained_states_are_walked():
  state = (_state('rigl'), optax.scale(2.0).init(PARAMS))
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, _inner_marker)
  assert isinstance(axes, tuple) and isinstance(axes[0], prunax.SparseState)
  assert axes[0].masks['token_embedder']['embedding'] == P('vocab', 'embed')
  assert axes[1] == _inner_marker(state[1], AXES)


def test_adafactor_state_gets_axes_without_the_inner_rules():
  """t5x's rules raise on optax.adafactor's FactoredState ("unregistered optax state type").

  With min_dim_size_to_factor=8 the 8 x 16 kernel is factored (row and column means,
  replicated) and the 12 x 8 embedding too; the 1-D scale keeps a full moment with its axes.
  """

  def t5x_rules(state, params_axes):
    del params_axes
    if isinstance(state, optax.FactoredState):
      raise ValueError('Encountered unregistered optax state type FactoredState')
    return jax.tree.map(lambda _: None, state)

  tx = prunax_t5x.pruned_optax(
    optax.adafactor(1e-2, min_dim_size_to_factor=8), 'magnitude', 0.5, dist_type='uniform'
  )
  state = jax.eval_shape(tx.init, PARAMS)
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, t5x_rules)
  factored = [s for s in axes.inner_state if isinstance(s, optax.FactoredState)]
  assert len(factored) == 1
  assert factored[0].v['encoder']['norm']['scale'] == P('embed')
  assert factored[0].v['encoder']['mlp']['wi'] is None  # a (1,) placeholder
  assert jax.tree.leaves(factored[0].v_row) == jax.tree.leaves(factored[0].v_col) == []
  assert factored[0].count is None
  assert axes.masks['encoder']['mlp']['wi'] == P('embed', 'mlp')
  # Not factored (dims below the default 128): every param keeps a full moment.
  state = jax.eval_shape(optax.adafactor(1e-2).init, PARAMS)
  axes = prunax_t5x.sparse_state_logical_axes(state, AXES, t5x_rules)
  assert axes[0].v == AXES


def test_layer_axes_prune_each_stacked_layer_on_its_own():
  # A scanned stack of 2 layers on axis 0: layer 0 holds small weights, layer 1 large ones.
  stacked = (
    jnp.concatenate([jnp.full((1, 8, 16), 0.01), jnp.ones((1, 8, 16))]).at[:, 0, :4].set(0.5)
  )
  params = {'decoder': {'layers': {'wi': stacked}}}
  tx = _parse("""
prunax_t5x.pruned_optax:
  optimizer = @optax.sgd()
  algorithm = 'magnitude'
  sparsity = 0.5
  dist_type = 'uniform'
  layer_axes = {'decoder/layers/wi': 0}
optax.sgd.learning_rate = 0.0
""")
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  kernel = optax.apply_updates(params, updates)['decoder']['layers']['wi']
  # Per layer: half of each layer's 128 weights are pruned (a single pool would prune
  # all of layer 0 and none of layer 1).
  assert [int(jnp.sum(kernel[i] == 0)) for i in range(2)] == [64, 64]


# optax.adafactor with the settings of t5x's own adafactor.Adafactor (t5x's default for
# T5): decay_rate 0.8, no momentum, update clipping 1.0, parameter scaling, factored second
# moments for dims >= 128, epsilon1 1e-30 (epsilon2 1e-3 is optax's fixed param-scale floor).
T5X_ADAFACTOR = dict(
  learning_rate=1e-2,
  decay_rate=0.8,
  momentum=None,
  clipping_threshold=1.0,
  multiply_by_parameter_scale=True,
  min_dim_size_to_factor=128,
  eps=1e-30,
  factored=True,
)


def test_t5x_adafactor_settings_prune():
  params = {
    'mlp': {'wi': jax.random.normal(jax.random.PRNGKey(0), (128, 256))},
    'norm': {'scale': jnp.ones(128)},
  }
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  tx = prunax_t5x.pruned_optax(
    optax.adafactor(**T5X_ADAFACTOR),
    'magnitude',
    0.5,
    dist_type='uniform',
    update_freq=1,
    update_start_step=0,
    update_end_step=1,
  )
  plain = optax.adafactor(**T5X_ADAFACTOR)
  state, plain_state = tx.init(params), plain.init(params)
  # Step 1 prunes nothing yet (gradual schedule, 0% after the first update): Adafactor's step.
  updates, state = jax.jit(tx.update)(grads, state, params)
  expected, plain_state = plain.update(grads, plain_state, params)
  np.testing.assert_allclose(updates['mlp']['wi'], expected['mlp']['wi'], rtol=1e-6)
  params = optax.apply_updates(params, updates)
  updates, state = jax.jit(tx.update)(grads, state, params)
  wi = optax.apply_updates(params, updates)['mlp']['wi']
  assert int(jnp.sum(wi == 0)) == 128 * 256 // 2

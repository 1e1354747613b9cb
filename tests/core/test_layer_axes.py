"""Stacked (scanned) layers: every slice along a layer axis is pruned as its own layer."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import prunax
from prunax import sparsity_schedules as sched

from .helpers import BoxedScan

L, D = 4, 64


def stacked_params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  w = jax.random.normal(k[0], (L, D, D))
  w = w.at[0].multiply(10.0)  # layer 0 dominates a whole-tensor top-k
  return {'layers': {'kernel': w}, 'head': jax.random.normal(k[1], (D, 12))}


def unrolled(params):
  out = {f'layer{i}': {'kernel': params['layers']['kernel'][i]} for i in range(L)}
  out['head'] = params['head']
  return out


def one_step(updater, params, grads=None):
  tx = updater.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params) if grads is None else grads
  _, state = jax.jit(tx.update)(grads, state, params)
  return prunax.bool_masks(state, params)


def layer_sparsities(mask):
  return [float(1.0 - np.mean(np.asarray(mask[i]))) for i in range(mask.shape[0])]


AXES = {'layers/kernel': 0}


def test_without_layer_axes_a_stack_is_pruned_to_death():
  # The failure the layer axes fix: one top-k over the stack empties layers 1-3.
  with pytest.warns(UserWarning, match="'layers/kernel'.*layer_axes"):
    masks = one_step(prunax.MagnitudePruning(sparsity=0.8), stacked_params())
  per_layer = layer_sparsities(masks['layers']['kernel'])
  assert per_layer[0] < 0.3 and min(per_layer[1:]) > 0.99


def test_functional_pruning_prunes_each_layer_with_a_per_leaf_distribution():
  # masks_from_scores, snip/grasp/synflow and iterative_magnitude_pruning took no layer
  # axes: with a per-leaf distribution a stack was one tensor, its layers 1-3 emptied by
  # layer 0's larger weights, and nothing warned.
  params = stacked_params()
  scores = jax.tree.map(jnp.abs, params)
  with pytest.warns(UserWarning, match="'layers/kernel'.*layer_axes"):
    whole = prunax.pruning_at_init.masks_from_scores(params, scores, 0.8, 'uniform')
  assert min(layer_sparsities(whole['layers']['kernel'])[1:]) > 0.99
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    masks = prunax.pruning_at_init.masks_from_scores(
      params, scores, 0.8, 'uniform', layer_axes=AXES
    )
    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p['layers']['kernel'][0]) @ p['head'])
    snip = prunax.pruning_at_init.snip(
      loss, params, jnp.ones((2, D)), 0.8, 'uniform', layer_axes=AXES
    )
    rounds = prunax.lottery.iterative_magnitude_pruning(
      lambda p, updater, save_step: (p, None, None), params, 1, 0.5, 0, 'uniform', layer_axes=AXES
    )
  assert layer_sparsities(masks['layers']['kernel']) == pytest.approx([0.8] * L, abs=1e-3)
  assert layer_sparsities(snip['layers']['kernel']) == pytest.approx([0.8] * L, abs=1e-3)
  assert layer_sparsities(rounds[1].masks['layers']['kernel']) == pytest.approx([0.5] * L)


@pytest.mark.parametrize('structure', ['unstructured', 'nm_2,4', 'block_4,4', 'channel_-1'])
def test_each_layer_at_its_target_and_equal_to_the_unrolled_model(structure):
  sparsity = 0.5 if structure.startswith('nm') else 0.75
  params = stacked_params()
  stacked = one_step(
    prunax.MagnitudePruning(sparsity=sparsity, sparsity_type=structure, layer_axes=AXES), params
  )
  flat = one_step(
    prunax.MagnitudePruning(sparsity=sparsity, sparsity_type=structure), unrolled(params)
  )
  for i in range(L):
    np.testing.assert_array_equal(stacked['layers']['kernel'][i], flat[f'layer{i}']['kernel'])
  np.testing.assert_array_equal(stacked['head'], flat['head'])
  assert layer_sparsities(stacked['layers']['kernel']) == [sparsity] * L


def test_erk_treats_each_layer_as_a_leaf():
  params = stacked_params()
  dist = prunax.sparsity_distributions.erk
  stacked = dist(params, 0.8, layer_axes=AXES)
  flat = dist(unrolled(params), 0.8)
  assert stacked['layers']['kernel'] == pytest.approx(flat['layer0']['kernel'], abs=1e-12)
  assert stacked['head'] == pytest.approx(flat['head'], abs=1e-12)
  # Without layer axes the layer axis counts as a fan dimension (the reported bug).
  assert dist(params, 0.8)['layers']['kernel'] != pytest.approx(stacked['layers']['kernel'])


def test_stacked_biases_are_not_pruned_by_the_default_filter():
  params = dict(stacked_params(), layers={'kernel': jnp.ones((L, D, D)), 'bias': jnp.ones((L, D))})
  targets = prunax.MagnitudePruning(sparsity=0.5, layer_axes={'layers/.*': 0}).target_sparsities(
    params
  )
  assert targets['layers']['bias'] is None and targets['layers']['kernel'] == 0.5


@pytest.mark.parametrize('name', ['uniform', 'erk'])
@pytest.mark.parametrize(
  'bind',
  [
    lambda fn: functools.partial(fn, filter_fn=prunax.sparsity_distributions.default_filter),
    lambda fn: functools.partial(fn),
    lambda fn: (
      prunax.sparsity_distributions.Partial(fn, erk_power_scale=1.0)
      if fn is prunax.sparsity_distributions.erk
      else prunax.sparsity_distributions.Partial(fn, custom_sparsity_map={})
    ),
    lambda fn: functools.wraps(fn)(lambda *a, **k: fn(*a, **k)),
    lambda fn: (
      lambda params, sparsity, layer_axes=None: fn(params, sparsity, layer_axes=layer_axes)
    ),
  ],
  ids=['functools_partial_filter', 'functools_partial', 'prunax_partial', 'wrapped', 'declares'],
)
def test_bound_distributions_see_one_layer_of_stacked_leaves(name, bind):
  # jaxpruner's configs bind the built-in distributions with functools.partial; they got
  # no layer axes, so the filter saw whole stacks (each layer's bias, 1-D, was pruned)
  # and ERK counted the layer axis as a fan dimension.
  params = dict(stacked_params(), layers={'kernel': jnp.ones((L, D, D)), 'bias': jnp.ones((L, D))})
  fn = getattr(prunax.sparsity_distributions, name)

  def targets(dist):
    updater = prunax.MagnitudePruning(
      sparsity=0.5, sparsity_distribution_fn=dist, layer_axes={'layers/.*': 0}
    )
    return updater.target_sparsities(params)

  expected = targets(name)
  assert expected['layers']['bias'] is None
  assert targets(bind(fn)) == expected


@pytest.mark.parametrize('name', ['uniform', 'erk'])
def test_distributions_take_layer_axes_as_updaters_do(name):
  # Called directly, uniform and erk read layer_axes by exact leaf name only: a regex
  # key (as updaters take) or a misspelt one matched nothing, and the stacks were
  # treated as plain leaves without a word.
  params = dict(stacked_params(), layers={'kernel': jnp.ones((L, D, D)), 'bias': jnp.ones((L, D))})
  dist = getattr(prunax.sparsity_distributions, name)
  named = dist(params, 0.8, layer_axes={'layers/kernel': 0, 'layers/bias': 0})
  assert named['layers']['bias'] is None
  assert dist(params, 0.8, layer_axes={'layers/.*': 0}) == named
  with pytest.raises(ValueError, match="layer_axes key 'layer/.*' matches no parameter"):
    dist(params, 0.8, layer_axes={'layer/.*': 0})


def test_a_wrapper_without_room_for_layer_axes_is_called_as_it_is():
  # functools.wraps(uniform) on f(params, sparsity): what it wraps takes layer_axes, it
  # does not (called with them, it raised a TypeError).
  params = dict(stacked_params(), layers={'kernel': jnp.ones((L, D, D)), 'bias': jnp.ones((L, D))})
  uniform = prunax.sparsity_distributions.uniform

  @functools.wraps(uniform)
  def halved(params, sparsity):
    return jax.tree.map(lambda s: s / 2, uniform(params, sparsity), is_leaf=lambda x: x is None)

  updater = prunax.MagnitudePruning(
    sparsity=0.5, sparsity_distribution_fn=halved, layer_axes={'layers/.*': 0}
  )
  targets = updater.target_sparsities(params)
  assert targets['layers']['kernel'] == 0.25 and targets['head'] == 0.25


def test_jaxpruner_nm_under_erk_sees_one_layer_of_stacked_leaves():
  # The compat N:M-under-ERK distribution decides from ERK which leaves stay dense; it
  # was called without the layer axes, so ERK ran on whole stacks.
  from prunax.compat import jaxpruner as jp

  params = dict(stacked_params(), layers={'kernel': jnp.ones((L, D, D)), 'bias': jnp.ones((L, D))})
  dist = functools.partial(prunax.sparsity_distributions.erk, sparsity=0.8)
  updater = jp.MagnitudePruning(
    sparsity_distribution_fn=dist, sparsity_type='nm_2,4', layer_axes={'layers/.*': 0}
  )
  targets = updater.target_sparsities(params)
  named_axes = {'layers/kernel': 0, 'layers/bias': 0}
  erk = prunax.sparsity_distributions.erk(params, 0.8, layer_axes=named_axes)
  assert targets['layers']['bias'] is None and erk['layers']['bias'] is None
  assert targets['layers']['kernel'] == (0.5 if erk['layers']['kernel'] else 0.0)


@pytest.mark.parametrize(
  'make',
  [
    lambda: prunax.RigL(
      sparsity=0.8,
      sparsity_distribution_fn='erk',
      layer_axes=AXES,
      scheduler=sched.PeriodicSchedule(1, 0),
    ),
    lambda: prunax.SET(sparsity=0.8, layer_axes=AXES, scheduler=sched.PeriodicSchedule(1, 0)),
    lambda: prunax.StaticRandomSparse(sparsity=0.8, layer_axes=AXES),
    lambda: prunax.RandomPruning(sparsity=0.8, layer_axes=AXES),
    lambda: prunax.SteMagnitudePruning(sparsity=0.8, layer_axes=AXES),
  ],
  ids=['rigl_erk', 'set', 'static', 'random', 'ste'],
)
def test_sparse_training_keeps_every_layer_exact(make):
  updater = make()
  params = stacked_params()
  target = updater.target_sparsities(params)['layers']['kernel']
  tx = updater.wrap_optax(optax.adam(1e-2))
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  mask = prunax.bool_masks(state, params)['layers']['kernel']
  expected = 1.0 - int(D * D - int(np.round(np.float32(target) * np.float32(D * D)))) / (D * D)
  assert layer_sparsities(mask) == pytest.approx([expected] * L, abs=1e-9)
  # Random draws differ between layers (one stream per layer).
  if type(updater).init_masks is not prunax.BaseUpdater.init_masks or isinstance(
    updater, prunax.RandomPruning
  ):
    assert not np.array_equal(mask[1], mask[2])


def test_summary_reports_each_layer():
  params = stacked_params()
  masks = one_step(prunax.MagnitudePruning(sparsity=0.75, layer_axes=AXES), params)
  summary = prunax.summarize_sparsity(masks, layer_axes=AXES)
  assert [summary[f'sparsity/layers/kernel/layer_{i}'] for i in range(L)] == [0.75] * L
  # Keys as updaters take them (regular expressions); one that matches nothing is
  # refused (looked up by exact name, a regex reported no layer and no error).
  assert prunax.summarize_sparsity(masks, layer_axes={'layers/.*': 0}) == summary
  with pytest.raises(ValueError, match="layer_axes key 'layer/.*' matches no leaf"):
    prunax.summarize_sparsity(masks, layer_axes={'layer/.*': 0})
  # A mask tree is None at a stacked leaf that is not pruned: its key is not an error.
  with_bias = dict(masks, layers=dict(masks['layers'], bias=None))
  assert prunax.summarize_sparsity(with_bias, layer_axes={'layers/.*': 0}) == summary


def test_linen_scan_layer_axes_are_read_from_the_boxes():
  variables = BoxedScan().init(jax.random.PRNGKey(0), jnp.ones((2, 16)))
  axes = prunax.layers.layer_axes_from_flax(variables['params'])
  assert axes == {'ScanStep_0/Dense_0/kernel': 0, 'ScanStep_0/Dense_1/kernel': 0}
  params = nn.unbox(variables['params'])
  # Unboxed params with the mapping, and boxed params with nothing declared, agree.
  masks = one_step(prunax.MagnitudePruning(sparsity=0.7, layer_axes=axes), params)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no "looks stacked" warning: the boxes say it
    boxed = one_step(prunax.MagnitudePruning(sparsity=0.7), variables['params'])
  for name in ('Dense_0', 'Dense_1'):
    mask = masks['ScanStep_0'][name]['kernel']
    np.testing.assert_array_equal(mask, nn.unbox(boxed)['ScanStep_0'][name]['kernel'])
    assert layer_sparsities(mask) == pytest.approx(
      [1.0 - (mask[0].size - round(0.7 * mask[0].size)) / mask[0].size] * 3
    )


class Linear(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(
      jax.random.normal(rngs.params(), (16, 16)),
      out_sharding=('embed', 'mlp'),
      eager_sharding=False,
    )

  def __call__(self, x):
    return x @ self.kernel


class NnxStack(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(rngs):
      return Linear(rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return jnp.tanh(layer(x))

    return self.head(body(self.layers, x))


def test_nnx_optimizer_without_declared_axes_warns_at_update():
  model = NnxStack(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, prunax.MagnitudePruning(sparsity=0.75).wrap_optax(optax.sgd(0.1)), wrt=nnx.Param
  )
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  with pytest.warns(UserWarning, match="'layers/kernel'.*no layer axis"):
    optimizer.update(model, grads)


def test_nnx_stacked_model_with_nnx_optimizer():
  model = NnxStack(nnx.Rngs(0))
  # nnx.Optimizer gives update() plain arrays: the axes are read from the Variables once.
  axes = prunax.layers.layer_axes_from_flax(nnx.state(model, nnx.Param))
  assert axes == {'layers/kernel': 0}
  updater = prunax.MagnitudePruning(sparsity=0.75, layer_axes=axes)
  optimizer = nnx.Optimizer(model, updater.wrap_optax(optax.adam(1e-2)), wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(2):
    step(model, optimizer)
  kernel = np.asarray(model.layers.kernel[...])
  assert layer_sparsities(kernel != 0) == [0.75] * 3


@pytest.mark.parametrize(
  'spec, error',
  [
    ({'nothing/.*': 0}, ValueError),
    ({'layers/kernel': 3}, ValueError),
    ({'layers/kernel': True}, TypeError),
    ({'layers/kernel': '0'}, TypeError),
    ([('layers/kernel', 0, 1)], TypeError),
  ],
)
def test_bad_layer_axes_are_rejected(spec, error):
  with pytest.raises(error, match='layer'):
    prunax.MagnitudePruning(sparsity=0.5, layer_axes=spec).target_sparsities(stacked_params())


@settings(max_examples=8, deadline=None)
@given(
  layers=st.integers(1, 4),
  rows=st.integers(1, 9),
  cols=st.integers(1, 40),
  axis=st.integers(0, 1),
  sparsity=st.floats(0.0, 0.95),
  seed=st.integers(0, 2**16),
)
@example(layers=2, rows=1, cols=1, axis=0, sparsity=0.75, seed=0)  # keeps its one weight
def test_exact_count_in_every_layer(layers, rows, cols, axis, sparsity, seed):
  shape = [rows, cols]
  shape.insert(axis, layers)
  w = jax.random.normal(jax.random.PRNGKey(seed), shape)
  updater = prunax.MagnitudePruning(sparsity=sparsity, layer_axes={'w': axis})
  _, masks = updater.instant_sparsify({'w': w})
  per_layer = np.moveaxis(np.asarray(masks['w']), axis, 0).reshape(layers, -1)
  n = rows * cols
  # round(sparsity * n) pruned, but at most n - 1: every layer keeps at least one weight.
  kept = n - min(int(np.round(np.float32(sparsity) * np.float32(n))), n - 1)
  assert per_layer.sum(axis=1).tolist() == [kept] * layers
  # Each layer keeps its own largest magnitudes.
  scores = np.moveaxis(np.abs(np.asarray(w)), axis, 0).reshape(layers, -1)
  for i in range(layers):
    if 0 < kept < n:
      assert scores[i][per_layer[i]].min() >= scores[i][~per_layer[i]].max()


@pytest.mark.parametrize(
  'make',
  [
    lambda axes: prunax.AutoSparse(
      s_init=-1.5, threshold_lr=5.0, backward_sparsity=0.5, layer_axes=axes
    ),
    # Thresholds trained by the weights' optimizer (its state per layer, like them).
    lambda axes: prunax.AutoSparse(
      s_init=-1.5, threshold_weight_decay=0.1, backward_sparsity=0.5, layer_axes=axes
    ),
    lambda axes: prunax.TopKAST(sparsity=0.8, backward_sparsity=0.5, penalty=1e-3, layer_axes=axes),
  ],
  ids=['autosparse_own_sgd', 'autosparse', 'topkast'],
)
def test_ste_families_match_the_unrolled_model(make):
  params = stacked_params()
  params['layers']['kernel'] = params['layers']['kernel'] * 0.3
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(5), x.shape), params)
  flat_grads = unrolled(grads)

  def train(updater, p, g):
    tx = updater.wrap_optax(optax.sgd(0.05))
    state = tx.init(p)
    update = jax.jit(tx.update)
    for _ in range(3):
      updates, state = update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p, prunax.get_sparse_state(state)

  p_stack, s_stack = train(make(AXES), params, grads)
  p_flat, s_flat = train(make(None), unrolled(params), flat_grads)
  for i in range(L):
    np.testing.assert_allclose(
      p_stack['layers']['kernel'][i], p_flat[f'layer{i}']['kernel'], rtol=1e-5, atol=1e-6
    )
  if not isinstance(
    getattr(s_stack.algorithm_state, 'thresholds', optax.MaskedNode()), optax.MaskedNode
  ):
    per_layer = np.asarray(s_stack.algorithm_state.thresholds['layers']['kernel']).reshape(-1)
    expected = [float(s_flat.algorithm_state.thresholds[f'layer{i}']['kernel']) for i in range(L)]
    np.testing.assert_allclose(per_layer, expected, rtol=1e-5)
    assert len(set(np.round(per_layer, 6))) == L  # layer 0 learns its own threshold


class TransformerBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h, h)
    h = nn.Dense(32)(nn.LayerNorm()(x))
    return x + nn.Dense(16)(nn.gelu(h)), None


class ScannedTransformer(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      TransformerBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=3
    )
    return stack()(x, None)[0]


def test_scanned_transformer_blocks_match_the_unrolled_blocks():
  params = ScannedTransformer().init(jax.random.PRNGKey(0), jnp.ones((2, 5, 16)))['params']
  axes = {'ScanTransformerBlock_0/.*': 0}  # every param of the block, norms included
  updater = prunax.MagnitudePruning(sparsity=0.6, sparsity_distribution_fn='erk', layer_axes=axes)
  resolved = updater.layer_axes_of(params)
  assert set(resolved.values()) == {0}
  targets = updater.target_sparsities(params)['ScanTransformerBlock_0']
  # q/k/v/out DenseGeneral kernels (4-D when stacked) and both MLP kernels are pruned
  # (and the 2-D q/k/v biases, as in an unrolled model); stacked norm scales and 1-D
  # biases are judged by one layer and left dense.
  pruned = [
    prunax.sparsity_distributions.path_name(p)
    for p, s in jax.tree_util.tree_flatten_with_path(targets)[0]
    if s is not None
  ]
  assert sum(n.endswith('kernel') for n in pruned) == 6, pruned
  assert not any(
    'LayerNorm' in n or n.startswith('Dense') and n.endswith('bias') for n in pruned
  ), pruned
  _, masks = jax.jit(updater.instant_sparsify)(params)
  blocks = [jax.tree.map(lambda x, i=i: x[i], params['ScanTransformerBlock_0']) for i in range(3)]
  flat = {f'block{i}': b for i, b in enumerate(blocks)}
  _, flat_masks = jax.jit(
    prunax.MagnitudePruning(sparsity=0.6, sparsity_distribution_fn='erk').instant_sparsify
  )(flat)
  stacked = masks['ScanTransformerBlock_0']
  for i in range(3):
    for path, m in jax.tree_util.tree_flatten_with_path(flat_masks[f'block{i}'])[0]:
      if m is None:
        continue
      sub = stacked
      for p in path:
        sub = sub[p.key]
      np.testing.assert_array_equal(np.asarray(sub)[i], m)

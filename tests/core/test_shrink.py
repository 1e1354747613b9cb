"""prunax.shrink: groups found from the jaxpr, group masks, and shrunk models that compute
what the masked models compute, with fewer channels."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import prunax
from prunax import shrinking as sh

from .helpers import BoxedScan
from .helpers import nnx_scanned_stack
from .helpers import xla_compiles


def apply_masks(params, masks):
  return jax.tree.map(
    lambda x, m: x if m is None else jnp.where(m, x, 0), params, masks, is_leaf=lambda x: x is None
  )


def assert_like_masked(shrunk, fn, params, masks, x):
  """The shrunk model (jitted) computes on ``x`` what ``fn`` of the masked params does."""
  np.testing.assert_allclose(
    jax.jit(shrunk.apply)(shrunk.params, x),
    fn(apply_masks(params, masks), x),
    rtol=1e-5,
    atol=1e-5,
  )


def check(model, variables, x, sparsity=0.5, score='l2', grads=None):
  groups = sh.find_groups(model, variables, x)
  masks = sh.group_masks(groups, variables, sparsity, score=score, grads=grads)
  shrunk = sh.shrink(model, variables, masks, x)
  want = model.apply(apply_masks(variables, masks), x)
  got = jax.jit(shrunk.apply)(shrunk.params, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  before = sum(v.size for v in jax.tree.leaves(variables))
  after = sum(v.size for v in jax.tree.leaves(shrunk.params))
  return groups, shrunk, before, after


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.gelu(nn.Dense(24)(x))
    return nn.Dense(5)(x)


def test_mlp_groups_and_shrink():
  model, x = MLP(), jnp.ones((3, 16))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups, shrunk, _, _ = check(model, variables, x)
  assert [set(g.members) for g in groups] == [
    {('params/Dense_0/kernel', 1), ('params/Dense_0/bias', 0), ('params/Dense_1/kernel', 0)},
    {('params/Dense_1/kernel', 1), ('params/Dense_1/bias', 0), ('params/Dense_2/kernel', 0)},
  ]
  shapes = jax.tree.map(jnp.shape, shrunk.params)['params']
  assert shapes['Dense_0'] == {'kernel': (16, 16), 'bias': (16,)}
  assert shapes['Dense_1'] == {'kernel': (16, 12), 'bias': (12,)}
  assert shapes['Dense_2'] == {'kernel': (12, 5), 'bias': (5,)}
  blocked = {
    frozenset(g.members): g.blocked_by
    for g in sh.find_groups(model, variables, x, include_blocked=True)
    if g.blocked_by
  }
  assert blocked == {
    frozenset({('params/Dense_0/kernel', 0)}): 'an input of the function',
    frozenset(
      {('params/Dense_2/kernel', 1), ('params/Dense_2/bias', 0)}
    ): 'an output of the function',
  }


_act = jax.jit(lambda h: jnp.tanh(h) * 2)  # a user's jitted function, called twice


class EqualWidths(nn.Module):
  """Hidden layers of one width through the same activations (relu: a custom_jvp call,
  _act: a jit call), whose traced jaxprs JAX shares between the call sites."""

  @nn.compact
  def __call__(self, x):
    x = _act(nn.relu(nn.Dense(16)(x)))
    x = _act(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(4)(x)


def test_layers_of_equal_width_are_separate_groups():
  # JAX traces jax.nn.relu (and any jitted function) once per input shape and shares that
  # jaxpr between its calls. find_groups analyzed the shared body once for both calls and
  # tied their axes: both hidden layers were one group (and every equal-width relu/silu
  # layer of an unrolled model), so they lost the same channel indices.
  model, x = EqualWidths(), jax.random.normal(jax.random.PRNGKey(1), (3, 8))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups = sh.find_groups(model, variables, x)
  assert [set(g.members) for g in groups] == [
    {('params/Dense_0/kernel', 1), ('params/Dense_0/bias', 0), ('params/Dense_1/kernel', 0)},
    {('params/Dense_1/kernel', 1), ('params/Dense_1/bias', 0), ('params/Dense_2/kernel', 0)},
  ]
  masks = sh.group_masks(groups, variables, 0.5)
  first, second = (np.asarray(masks['params'][f'Dense_{i}']['bias']) for i in (0, 1))
  assert first.sum() == second.sum() == 8 and (first != second).any()
  shrunk = sh.shrink(model, variables, masks, x)  # replays each call site's own copy
  x2 = jax.random.normal(jax.random.PRNGKey(2), (5, 8))
  assert_like_masked(shrunk, model.apply, variables, masks, x2)
  assert shrunk.params['params']['Dense_1']['kernel'].shape == (8, 8)


class DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(4)(h)


def test_groups_of_a_training_function_with_dropout():
  # Dropout draws random bits shaped like the activation and converts them to floats
  # (bitcast_convert_type): both blocked every group they touched, so a train step's
  # hidden units could not be pruned by group. They follow the activation now.
  model, x = DropoutMLP(), jax.random.normal(jax.random.PRNGKey(1), (3, 8))
  variables = model.init(jax.random.PRNGKey(0), x, False)
  train = lambda v, x: model.apply(v, x, True, rngs={'dropout': jax.random.PRNGKey(3)})
  evaluate = lambda v, x: model.apply(v, x, False)
  groups = sh.find_groups(train, variables, x)
  assert [set(g.members) for g in groups] == [
    {('params/Dense_0/kernel', 1), ('params/Dense_0/bias', 0), ('params/Dense_1/kernel', 0)}
  ]
  masks = sh.group_masks(groups, variables, 0.5)
  shrunk = sh.shrink(evaluate, variables, masks, x)
  assert shrunk.params['params']['Dense_1']['kernel'].shape == (8, 4)
  # The training function shrinks too, but draws fewer random bits: named in the error.
  with pytest.raises(
    sh.ShrinkError, match=r'draws 1 random array\(s\) over shrunk channels \(dropout\?\)'
  ):
    sh.shrink(train, variables, masks, x)


def _through_cond(p, h, x):
  return jax.lax.cond(x.sum() > 0, jax.nn.relu, lambda h: jnp.tanh(h) * p['s'], h)


def _through_while(p, h, x):
  steps = jnp.where(x.sum() > 0, 1, 3)
  return jax.lax.while_loop(
    lambda c: c[0] < steps, lambda c: (c[0] + 1, jnp.tanh(c[1]) * p['s']), (0, h)
  )[1]


@pytest.mark.parametrize('flow', [_through_cond, _through_while], ids=['cond', 'while'])
def test_groups_go_through_control_flow(flow):
  # A lax.cond or while_loop blocked every axis it touched. A cond's branches take the
  # operands and give the outputs, a loop's carries keep their axes from the initial to
  # the final value: their axes are tied, and a replay runs the replayed branches/body.
  def mlp(p, x):
    return flow(p, x @ p['w1'] + p['b1'], x) @ p['w2']

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  shapes = {'w1': (8, 16), 'b1': (16,), 's': (16,), 'w2': (16, 2)}
  params = {k: jax.random.normal(key, shape) for key, (k, shape) in zip(keys, shapes.items())}
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  groups = sh.find_groups(mlp, params, x)
  assert [set(g.members) for g in groups] == [{('w1', 1), ('b1', 0), ('s', 0), ('w2', 0)}]
  masks = sh.group_masks(groups, params, 0.5)
  shrunk = sh.shrink(mlp, params, masks, x)
  assert shrunk.params['w1'].shape == (8, 8)
  for inputs in (jnp.abs(x), -jnp.abs(x)):  # each branch, or 1 and 3 iterations
    assert_like_masked(shrunk, mlp, params, masks, inputs)


def test_scores_choose_the_weakest_channels():
  model, x = MLP(), jnp.ones((3, 16))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups = sh.find_groups(model, variables, x)
  p = variables['params']
  for score, fn in (('l1', np.abs), ('l2', np.square)):
    masks = sh.group_masks(groups, variables, 0.25, score=score)
    total = (
      fn(np.asarray(p['Dense_0']['kernel'])).sum(0)
      + fn(np.asarray(p['Dense_0']['bias']))
      + fn(np.asarray(p['Dense_1']['kernel'])).sum(1)
    )
    want = np.sort(np.argsort(total)[8:])
    np.testing.assert_array_equal(
      np.nonzero(np.asarray(masks['params']['Dense_0']['bias']))[0], want
    )
  grads = jax.tree.map(jnp.ones_like, variables)
  taylor = sh.group_masks(groups, variables, 0.25, score='taylor', grads=grads)
  l1 = sh.group_masks(groups, variables, 0.25, score='l1')
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), taylor, l1))
  with pytest.raises(ValueError, match='valid scores are'):
    sh.group_masks(groups, variables, 0.5, score='l3')
  with pytest.raises(ValueError, match='needs grads'):
    sh.group_masks(groups, variables, 0.5, score='taylor')


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.relu(nn.Conv(12, (3, 3))(x))
    x = x.mean(axis=(1, 2))  # global average pooling
    return nn.Dense(4)(x)


def test_cnn_with_batchnorm():
  model, x = CNN(), jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  # Non-trivial BatchNorm statistics, so dropping them matters.
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  groups, shrunk, before, after = check(model, variables, x)
  members = {m for g in groups for m in g.members}
  assert {
    ('batch_stats/BatchNorm_0/mean', 0),
    ('params/BatchNorm_0/scale', 0),
    ('params/Conv_1/kernel', 2),
  } <= members
  assert shrunk.params['params']['Conv_1']['kernel'].shape == (3, 3, 8, 6)
  assert shrunk.params['batch_stats']['BatchNorm_0']['var'].shape == (8,)
  assert after < 0.6 * before


class Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32)(x)
    for _ in range(2):
      # Residual stream of 32 channels; Dense(32) is named before the Dense(48) it reads.
      h = h + nn.Dense(32)(nn.relu(nn.Dense(48)(h)))
    return nn.Dense(4)(h)


def test_residual_network_ties_the_stream():
  model, x = Residual(), jax.random.normal(jax.random.PRNGKey(1), (3, 8))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups, shrunk, _, _ = check(model, variables, x)
  stream = next(g for g in groups if ('params/Dense_0/kernel', 1) in g.members)
  assert set(stream.members) >= {
    ('params/Dense_1/kernel', 1),
    ('params/Dense_3/kernel', 1),
    ('params/Dense_2/kernel', 0),
    ('params/Dense_4/kernel', 0),
    ('params/Dense_5/kernel', 0),
    ('params/Dense_1/bias', 0),
  }
  p = shrunk.params['params']
  assert p['Dense_5']['kernel'].shape == (16, 4)
  assert p['Dense_2']['kernel'].shape == (16, 24)  # stream in, hidden out
  assert p['Dense_1']['kernel'].shape == (24, 16)  # hidden in, stream out


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(16)(nn.gelu(nn.Dense(64)(h)))


def test_transformer_block_heads_and_mlp():
  model, x = Block(), jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups, shrunk, _, _ = check(model, variables, x)
  att = 'params/MultiHeadDotProductAttention_0'
  heads = next(g for g in groups if (f'{att}/query/kernel', 1) in g.members)
  assert heads.size == 4
  assert {
    (f'{att}/key/kernel', 1),
    (f'{att}/value/kernel', 1),
    (f'{att}/out/kernel', 0),
    (f'{att}/query/bias', 0),
  } <= set(heads.members)
  p = shrunk.params['params']
  assert p['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (16, 2, 4)
  assert p['MultiHeadDotProductAttention_0']['out']['kernel'].shape == (2, 4, 16)
  assert p['Dense_1']['kernel'].shape == (16, 32)  # Dense(64), named after Dense(16)
  assert p['Dense_0']['kernel'].shape == (32, 16)
  # The residual stream is an input and output and goes through LayerNorm's mean.
  stream = next(
    g
    for g in sh.find_groups(model, variables, x, include_blocked=True)
    if ('params/Dense_0/kernel', 1) in g.members
  )
  assert stream.blocked_by is not None and stream.size == 16


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.scan(BlockStep, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)()(
      x, None
    )[0]
    return nn.Dense(4)(x)


class BlockStep(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return Block()(x), x.mean(axis=-1)  # the next layer's input, and a per-layer output


def test_scanned_blocks_shrink_layer_by_layer():
  # A scan's body sees one layer's slice of the stacked params: axis i + 1 of a stacked
  # leaf is the body's axis i. Read as a plain call (axis i is axis i), the layer axis
  # was tied to the first feature axis, groups mixed sizes, and group_masks failed
  # ("add got incompatible shapes for broadcasting: (3,), (16,)").
  model, x = Stack(), jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups, shrunk, before, after = check(model, variables, x)
  stack = 'params/ScanBlockStep_0/Block_0'
  att = f'{stack}/MultiHeadDotProductAttention_0'
  heads = next(g for g in groups if (f'{att}/query/kernel', 2) in g.members)
  assert heads.size == 4
  assert {(f'{att}/key/kernel', 2), (f'{att}/out/kernel', 1), (f'{att}/query/bias', 1)} <= set(
    heads.members
  )
  hidden = next(g for g in groups if (f'{stack}/Dense_1/kernel', 2) in g.members)
  assert set(hidden.members) == {
    (f'{stack}/Dense_1/kernel', 2),
    (f'{stack}/Dense_1/bias', 1),
    (f'{stack}/Dense_0/kernel', 1),
  }
  # Heads and hidden units live inside the body: each layer chooses its own.
  assert heads.layer_axes == (0,) * len(heads.members)
  assert hidden.layer_axes == (0, 0, 0)
  p = shrunk.params['params']['ScanBlockStep_0']['Block_0']
  assert p['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (3, 16, 2, 4)
  assert p['Dense_1']['kernel'].shape == (3, 16, 32)
  assert p['Dense_0']['kernel'].shape == (3, 32, 16)
  assert after < before
  # The layer axis is no channel axis: its groups are blocked by the scan.
  blocked = sh.find_groups(model, variables, x, include_blocked=True)
  layer = next(g for g in blocked if (f'{stack}/Dense_1/kernel', 0) in g.members)
  assert layer.size == 3 and layer.blocked_by.startswith('scan')
  # The residual stream is the scan's carry: tied through every layer to the input.
  stream = next(g for g in blocked if (f'{stack}/Dense_0/kernel', 2) in g.members)
  assert ('params/Dense_0/kernel', 0) in stream.members and stream.blocked_by is not None
  assert stream.layer_axes is None


class HiddenStack(nn.Module):
  """Three residual MLP layers as one nn.scan, their params' layer axis at ``axis``; the
  stream (the scan's carry) goes through a Dense before and after the scan."""

  axis: int = 0

  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return x + nn.Dense(8)(nn.relu(nn.Dense(12)(x))), None

    scan = nn.scan(
      Layer, variable_axes={'params': self.axis}, split_rngs={'params': True}, length=3
    )
    return nn.Dense(4)(scan()(nn.Dense(8)(x), None)[0])


@pytest.mark.parametrize('axis', [0, 1])
def test_each_scanned_layer_keeps_its_own_channels(axis):
  # Before, a group of a scanned stack summed its scores over the layers and removed the
  # same channel indices from every layer, although hidden unit i of one layer has nothing
  # to do with unit i of another (in the unrolled model they are separate groups).
  model, x = HiddenStack(axis), jax.random.normal(jax.random.PRNGKey(1), (5, 6))
  variables = model.init(jax.random.PRNGKey(0), x)
  layer = 'params/ScanLayer_0'
  groups = sh.find_groups(model, variables, x)
  hidden = next(g for g in groups if (f'{layer}/Dense_1/kernel', 2) in g.members)
  assert hidden.size == 12 and hidden.layer_axes == (axis, axis, axis)
  stream = next(g for g in groups if (f'{layer}/Dense_0/bias', 1 - axis) in g.members)
  assert stream.layer_axes is None  # the carry: the same channels in every layer
  masks = sh.group_masks([hidden], variables, 0.5)  # the stream stays whole
  # Each layer's 6 kept units: its own largest sums of squares over its slices.
  p = variables['params']['ScanLayer_0']
  w_in, b_in, w_out = (
    np.moveaxis(np.asarray(a), axis, 0)
    for a in (p['Dense_1']['kernel'], p['Dense_1']['bias'], p['Dense_0']['kernel'])
  )
  scores = (w_in**2).sum(1) + b_in**2 + (w_out**2).sum(2)  # (layers, units)
  want = np.zeros((3, 12), bool)
  np.put_along_axis(want, np.argsort(-scores, axis=1)[:, :6], True, axis=1)
  got = np.moveaxis(np.asarray(masks['params']['ScanLayer_0']['Dense_1']['bias']), axis, 0)
  np.testing.assert_array_equal(got, want)
  assert len({tuple(row) for row in want}) == 3  # three different choices
  shrunk = sh.shrink(model, variables, masks, x)  # checked against the masked model
  small = np.moveaxis(
    np.asarray(shrunk.params['params']['ScanLayer_0']['Dense_1']['kernel']), axis, 0
  )
  assert small.shape == (3, 8, 6)
  for i in range(3):  # each layer holds its own kept units, in order
    np.testing.assert_array_equal(small[i], w_in[i][:, np.nonzero(want[i])[0]])
  x2 = jax.random.normal(jax.random.PRNGKey(2), (7, 6))
  assert_like_masked(shrunk, model.apply, variables, masks, x2)


def test_scanned_layers_with_uneven_masks_keep_the_largest_count():
  # Hand-made masks: layer 0 prunes units 0-2, layer 1 unit 5, layer 2 units 7 and 9.
  # A stack has one shape, so each layer keeps 11 units: its live ones, padded by its
  # first dead ones, which hold zeros as in the masked model.
  model, x = HiddenStack(), jax.random.normal(jax.random.PRNGKey(1), (5, 6))
  variables = model.init(jax.random.PRNGKey(0), x)
  live = np.ones((3, 12), bool)
  live[0, :3], live[1, 5], live[2, [7, 9]] = False, False, False
  p = variables['params']['ScanLayer_0']
  masks = jax.tree.map(lambda _: None, variables)
  masks['params']['ScanLayer_0']['Dense_1'] = {  # Dense(12): flax names it after Dense(8)
    'kernel': np.broadcast_to(live[:, None, :], p['Dense_1']['kernel'].shape),
    'bias': live,
  }
  shrunk = sh.shrink(model, variables, masks, x)  # checked against the masked model
  assert shrunk.params['params']['ScanLayer_0']['Dense_0']['kernel'].shape == (3, 11, 8)
  assert list(shrunk.sizes.values()) == [(12, 11)]
  bias = np.asarray(shrunk.params['params']['ScanLayer_0']['Dense_1']['bias'])
  full = np.where(live, np.asarray(p['Dense_1']['bias']), 0)
  kept = [[0, 1, *range(3, 12)], [i for i in range(12) if i != 5], [i for i in range(12) if i != 9]]
  for i in range(3):
    np.testing.assert_array_equal(bias[i], full[i, kept[i]])


def test_boxed_scan_shrinks_per_layer_and_runs_its_own_code():
  # linen_apply read a boxed kernel's shape as () (the box), and failed.
  model, x = BoxedScan(), jax.random.normal(jax.random.PRNGKey(1), (4, 32))
  variables = model.init(jax.random.PRNGKey(0), x)
  (hidden,) = sh.find_groups(model, variables, x)
  assert hidden.size == 64 and hidden.layer_axes == (0, 0, 0)
  masks = sh.group_masks([hidden], variables, 0.5)
  shrunk = sh.shrink(model, variables, masks, x)
  kernel = shrunk.params['params']['ScanStep_0']['Dense_0']['kernel']
  assert kernel.names == ('layers', 'embed', 'mlp') and kernel.unbox().shape == (3, 32, 32)
  got = jax.jit(lambda p, x: sh.linen_apply(model, p, x))(shrunk.params, x)
  np.testing.assert_allclose(
    got, model.apply(apply_masks(variables, masks), x), rtol=1e-5, atol=1e-5
  )


def test_nnx_scan_over_vmapped_layers():
  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.attention = nnx.MultiHeadAttention(
        num_heads=4, in_features=16, qkv_features=32, decode=False, rngs=rngs
      )
      self.a, self.b = nnx.Linear(16, 48, rngs=rngs), nnx.Linear(48, 16, rngs=rngs)

    def __call__(self, x):
      x = x + self.attention(x, x)
      return x + self.b(jax.nn.relu(self.a(x)))

  graphdef, state = nnx.split(nnx_scanned_stack(Layer, nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  groups = sh.find_groups(fn, state, x)
  hidden = next(g for g in groups if ('layers/a/kernel/value', 2) in g.members)
  assert set(hidden.members) == {
    ('layers/a/kernel/value', 2),
    ('layers/a/bias/value', 1),
    ('layers/b/kernel/value', 1),
  }
  heads = next(g for g in groups if ('layers/attention/query/kernel/value', 2) in g.members)
  assert heads.size == 4 and ('layers/attention/out/kernel/value', 1) in heads.members
  masks = sh.group_masks(groups, state, 0.5)
  shrunk = sh.shrink(fn, state, masks, x)  # checks the shrunk model against the masked
  assert shrunk.params['layers']['a']['kernel'][...].shape == (3, 16, 24)
  assert shrunk.params['layers']['attention']['query']['kernel'][...].shape == (3, 16, 2, 4)
  # The smaller module itself: its stacked LinearGeneral layers get their per-layer sizes.
  small = sh.nnx_merge(graphdef, shrunk.params)
  assert small.layers.attention.query.out_features == (2, 4)
  x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 16))
  np.testing.assert_allclose(small(x2), fn(apply_masks(state, masks), x2), rtol=1e-5, atol=1e-5)


def test_shard_map_blocks_the_axes_through_its_body():
  # A shard_map's body sees each device's shard and may run collectives: read as a plain
  # call, its axes grouped as if whole, and shrink's replay of the body failed ("pvary
  # should be called under jax.shard_map"). Its axes now block with the op named, and the
  # shard_map is replayed as it is.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  double = jax.shard_map(lambda h: h * 2.0, mesh=mesh, in_specs=jax.P('x'), out_specs=jax.P('x'))

  def fn(p, x):
    h = double(jax.nn.relu(x @ p['w1'] + p['b1']))
    return jax.nn.relu(h @ p['w2']) @ p['w3']

  k = jax.random.split(jax.random.PRNGKey(0), 3)
  p = {
    'w1': jax.random.normal(k[0], (8, 16)),
    'b1': jnp.zeros(16),
    'w2': jax.random.normal(k[1], (16, 12)),
    'w3': jax.random.normal(k[2], (12, 3)),
  }
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
  (hidden,) = sh.find_groups(fn, p, x)
  assert set(hidden.members) == {('w2', 1), ('w3', 0)}
  blocked = sh.find_groups(fn, p, x, include_blocked=True)
  through = next(g for g in blocked if ('w1', 1) in g.members)
  assert through.blocked_by.startswith('shard_map')
  masks = sh.group_masks((hidden,), p, 0.5)
  shrunk = sh.shrink(fn, p, masks, x)
  assert shrunk.params['w2'].shape == (16, 6)
  np.testing.assert_allclose(
    jax.jit(shrunk)(shrunk.params, x), fn(apply_masks(p, masks), x), rtol=1e-5, atol=1e-5
  )
  masks = sh.group_masks((through,), p, 0.5)
  with pytest.raises(sh.ShrinkError, match='shard_map'):
    sh.shrink(fn, p, masks, x)


def test_nnx_mlp():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((2, 8))
  groups = sh.find_groups(fn, state, x)
  masks = sh.group_masks(groups, state, 0.75)
  shrunk = sh.shrink(fn, state, masks, x)
  np.testing.assert_allclose(
    np.asarray(shrunk(shrunk.params, x)),
    np.asarray(fn(apply_masks(state, masks), x)),
    rtol=1e-5,
    atol=1e-6,
  )
  assert jnp.shape(shrunk.params['a']['kernel'][...]) == (8, 8)


class Flatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_errors_name_the_op():
  model, x = Flatten(), jnp.ones((2, 4, 4, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups = sh.find_groups(model, variables, x, include_blocked=True)
  conv_out = next(g for g in groups if ('params/Conv_0/kernel', 3) in g.members)
  assert conv_out.blocked_by.startswith('reshape (2, 4, 4, 8) -> (2, 128)')
  masks = jax.tree.map(lambda v: None, variables)
  masks['params']['Conv_0']['kernel'] = jnp.ones((3, 3, 3, 8), bool).at[..., :4].set(False)
  with pytest.raises(sh.ShrinkError, match=r'goes through reshape \(2, 4, 4, 8\)'):
    sh.shrink(model, variables, masks, x)
  # A mask that leaves the bias alive: the removed channels are not dead.
  mlp, x = MLP(), jnp.ones((3, 16))
  variables = mlp.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.5 if v.ndim == 1 else v, variables)
  masks = jax.tree.map(lambda v: None, variables)
  masks['params']['Dense_0']['kernel'] = jnp.ones((16, 32), bool).at[:, :8].set(False)
  with pytest.raises(sh.ShrinkError, match='not dead in the masked model'):
    sh.shrink(mlp, variables, masks, x)


def test_gradual_group_pruning_through_wrap_optax():
  model, x = MLP(), jax.random.normal(jax.random.PRNGKey(2), (8, 16))
  variables = model.init(jax.random.PRNGKey(0), x)
  groups = sh.find_groups(model, variables, x)
  schedule = prunax.sparsity_schedules.PolynomialSchedule(
    update_freq=1, update_start_step=0, update_end_step=2
  )
  pruner = sh.GroupPruning(sparsity=0.5, groups=groups, scheduler=schedule, score='taylor')
  tx = pruner.wrap_optax(optax.sgd(0.1))
  state = tx.init(variables)
  loss = lambda v: jnp.mean(model.apply(v, x) ** 2)

  @jax.jit
  def step(v, state):
    updates, state = tx.update(jax.grad(loss)(v), state, v)
    return optax.apply_updates(v, updates), state

  for _ in range(4):
    variables, state = step(variables, state)
  masks = prunax.bool_masks(state, variables)
  kept = np.asarray(masks['params']['Dense_0']['bias'])
  assert kept.sum() == 16
  np.testing.assert_array_equal(np.asarray(masks['params']['Dense_0']['kernel']).any(0), kept)
  np.testing.assert_array_equal(np.asarray(masks['params']['Dense_1']['kernel']).any(1), kept)
  shrunk = sh.shrink(model, variables, masks, x)  # params are already masked
  np.testing.assert_allclose(
    np.asarray(shrunk(shrunk.params, x)),
    np.asarray(model.apply(variables, x)),
    rtol=1e-5,
    atol=1e-5,
  )
  assert shrunk.params['params']['Dense_1']['kernel'].shape == (16, 12)


def test_group_pruning_of_a_scanned_stack_keeps_each_layer_s_own_channels():
  model, x = Stack(), jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  schedule = prunax.sparsity_schedules.PolynomialSchedule(1, 0, 2)
  pruner = sh.GroupPruning(sparsity=0.5, groups=sh.find_groups(fn, params, x), scheduler=schedule)
  tx = pruner.wrap_optax(optax.adam(1e-2))
  with warnings.catch_warnings():
    # No "looks like a stack of layers" warning: every layer keeps the same count.
    warnings.simplefilter('error')
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(lambda p: jnp.mean(fn(p, x) ** 2))(p), s, p))
    for _ in range(3):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
  hidden = prunax.bool_masks(state, params)['ScanBlockStep_0']['Block_0']['Dense_1']['bias']
  np.testing.assert_array_equal(np.asarray(hidden).sum(axis=1), [32, 32, 32])
  assert len({tuple(np.asarray(row)) for row in hidden}) == 3  # each layer its own units
  shrunk = sh.shrink(fn, params, prunax.bool_masks(state, params), x)
  assert shrunk.params['ScanBlockStep_0']['Block_0']['Dense_1']['kernel'].shape == (3, 16, 32)


@pytest.mark.parametrize(
  'model,shape,other',
  [(CNN(), (2, 8, 8, 3), (5, 8, 8, 3)), (Block(), (2, 5, 16), (3, 7, 16))],
)
def test_shrunk_model_runs_on_other_input_shapes(model, shape, other):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  variables = model.init(jax.random.PRNGKey(0), x)
  masks = sh.group_masks(sh.find_groups(model, variables, x), variables, 0.5)
  shrunk = sh.shrink(model, variables, masks, x)
  x2 = jax.random.normal(jax.random.PRNGKey(2), other)
  assert_like_masked(shrunk, model.apply, variables, masks, x2)


@pytest.mark.parametrize(
  'model,shape',
  [
    (MLP(), (3, 16)),
    (Residual(), (3, 8)),
    (CNN(), (2, 8, 8, 3)),
    # Attention whose head dimension shrinks (8 -> 4): flax scales the logits by
    # 1 / sqrt of the query's size, so the module's own code gave other outputs than the
    # masked model (max gap 0.25 here) until linen_apply kept the original scale.
    (Block(), (2, 5, 16)),
    (Stack(), (2, 5, 16)),  # the same blocks in an nn.scan
  ],
  ids=['mlp', 'residual', 'cnn', 'attention', 'scanned_attention'],
)
def test_linen_module_runs_on_shrunk_params(model, shape):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  variables = model.init(jax.random.PRNGKey(0), x)
  masks = sh.group_masks(sh.find_groups(model, variables, x), variables, 0.5)
  shrunk = sh.shrink(model, variables, masks, x)
  with pytest.raises(Exception, match='shape'):  # the module's own sizes no longer fit
    model.apply(shrunk.params, x)
  x2 = jax.random.normal(jax.random.PRNGKey(2), (7,) + shape[1:])
  got = jax.jit(lambda p, x: sh.linen_apply(model, p, x))(shrunk.params, x2)
  want = model.apply(apply_masks(variables, masks), x2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nnx_module_merged_with_shrunk_state_is_the_smaller_model():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
      self.norm = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
      self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.head(jax.nn.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
  masks = sh.group_masks(sh.find_groups(fn, state, x), state, 0.5)
  shrunk = sh.shrink(fn, state, masks, x)
  small = nnx.merge(graphdef, shrunk.params)
  assert small.conv.kernel.shape == (3, 3, 3, 8) and small.norm.mean.shape == (8,)
  x2 = jax.random.normal(jax.random.PRNGKey(2), (5, 6, 6, 3))
  np.testing.assert_allclose(small(x2), fn(apply_masks(state, masks), x2), rtol=1e-5, atol=1e-6)


def test_nnx_transformer_block_heads_and_mlp():
  class NnxBlock(nnx.Module):
    def __init__(self, rngs):
      self.norm1 = nnx.LayerNorm(16, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
        num_heads=4, in_features=16, qkv_features=32, decode=False, rngs=rngs
      )
      self.norm2 = nnx.LayerNorm(16, rngs=rngs)
      self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
      h = self.norm1(x)
      x = x + self.attention(h, h)
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  graphdef, state = nnx.split(NnxBlock(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
  groups = sh.find_groups(fn, state, x)
  heads = next(g for g in groups if ('attention/query/kernel/value', 1) in g.members)
  assert heads.size == 4 and ('attention/out/kernel/value', 0) in heads.members
  masks = sh.group_masks(groups, state, 0.5)
  shrunk = sh.shrink(fn, state, masks, x)
  assert jnp.shape(shrunk.params['attention']['query']['kernel'][...])[1] == 2
  assert jnp.shape(shrunk.params['up']['kernel'][...]) == (16, 32)
  x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 16))
  want = fn(apply_masks(state, masks), x2)
  np.testing.assert_allclose(shrunk(shrunk.params, x2), want, rtol=1e-5, atol=1e-5)
  # The module itself: LinearGeneral reshapes its bias to its declared out_features, so a
  # plain nnx.merge fails; nnx_merge fits the declared sizes and keeps attention's scale.
  with pytest.raises(TypeError, match='reshape'):
    nnx.merge(graphdef, shrunk.params)(x2)
  small = sh.nnx_merge(graphdef, shrunk.params)
  assert (small.attention.num_heads, small.attention.head_dim) == (2, 4)
  np.testing.assert_allclose(small(x2), want, rtol=1e-5, atol=1e-5)


def _mlp(p, x):
  h = jax.nn.relu(x @ p['w1'] + p['b1'])
  return jnp.tanh(h @ p['w2'] + p['b2']) @ p['w3']


def _mlp_case(rng, dims, keep1, keep2, w2_kept=None):
  """Params of :func:`_mlp` of layer widths ``dims`` (input, two hidden, output) and masks
  keeping the hidden channels ``keep1``, ``keep2`` (and ``w2_kept`` of ``w2``)."""
  n_in, h1, h2, n_out = dims
  sizes = {'w1': (n_in, h1), 'b1': (h1,), 'w2': (h1, h2), 'b2': (h2,), 'w3': (h2, n_out)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in sizes.items()}
  w2 = np.broadcast_to(keep1[:, None] & keep2, (h1, h2))
  masks = {
    'w1': np.broadcast_to(keep1, (n_in, h1)),
    'b1': keep1,
    'w2': w2 if w2_kept is None else w2 & w2_kept,
    'b2': keep2,
    'w3': None,
  }
  return params, masks


def test_a_shrunk_model_called_outside_jit_compiles_one_program_per_input_shapes():
  # Op by op, each replayed operation compiled for its new shapes (6 programs for this MLP's
  # new batch size); now one program per input shapes, none for the same shapes again.
  rng = np.random.default_rng(4)
  params, masks = _mlp_case(rng, (7, 13, 11, 3), np.arange(13) % 3 != 0, np.arange(11) % 4 != 1)
  shrunk = prunax.shrink(_mlp, params, masks, jnp.ones((2, 7)))
  assert shrunk.sizes == {('b1', 0): (13, 8), ('b2', 0): (11, 8)}
  with xla_compiles() as compiles:
    for batch, again in ((5, False), (5, True), (9, False)):
      x = jnp.asarray(rng.standard_normal((batch, 7)), jnp.float32)
      compiles.clear()
      got = shrunk(shrunk.params, x)
      assert len(compiles) == (0 if again else 1), (batch, again, len(compiles))
      want = jax.jit(_mlp)(apply_masks(params, masks), x)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_shrink_masks_and_slices_the_params_in_one_program():
  # Op by op, masking the params and slicing their channels compiled a program for every
  # leaf's where and every take (14 compiles in all for this MLP); now one for all, and
  # the two checked models (masked and shrunk) one each.
  rng = np.random.default_rng(6)
  keep1, keep2 = np.arange(17) % 4 != 2, np.arange(15) % 3 != 0
  params, masks = _mlp_case(rng, (9, 17, 15, 4), keep1, keep2, rng.random((17, 15)) < 0.8)
  x = jnp.ones((2, 9))
  with xla_compiles() as compiles:
    shrunk = prunax.shrink(lambda p, x: _mlp(p, x), params, masks, x)  # nothing cached
  assert len(compiles) == 3, len(compiles)
  masked = apply_masks(params, masks)
  want = {
    'w1': np.asarray(masked['w1'])[:, keep1],
    'b1': np.asarray(masked['b1'])[keep1],
    'w2': np.asarray(masked['w2'])[keep1][:, keep2],
    'b2': np.asarray(masked['b2'])[keep2],
    'w3': np.asarray(masked['w3'])[keep2],
  }
  for name, w in want.items():
    np.testing.assert_array_equal(np.asarray(shrunk.params[name]), w, err_msg=name)


def test_group_masks_compile_one_program_and_keep_the_top_scored_channels():
  # Op by op, each group's channel selection ran its search an operation at a time (3.5 s
  # for the benchmark MLP); now one program per groups and shapes, whatever the sparsity.
  def mlp(p, x):
    return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2']

  rng = np.random.default_rng(5)
  sizes = {'w1': (6, 19), 'b1': (19,), 'w2': (19, 5)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in sizes.items()}
  groups = prunax.find_groups(mlp, params, jnp.ones((1, 6)))
  score = (params['w1'] ** 2).sum(0) + params['b1'] ** 2 + (params['w2'] ** 2).sum(1)
  with xla_compiles() as compiles:
    for sparsity, pruned in ((0.5, 10), (0.25, 5)):  # round(9.5) = 10, round(4.75) = 5
      compiles.clear()
      masks = prunax.group_masks(groups, params, sparsity)
      assert len(compiles) == (1 if sparsity == 0.5 else 0), (sparsity, len(compiles))
      kept = np.sort(np.argsort(-np.asarray(score), kind='stable')[: 19 - pruned])
      np.testing.assert_array_equal(np.nonzero(np.asarray(masks['b1']))[0], kept)
      np.testing.assert_array_equal(np.asarray(masks['w1']), np.broadcast_to(masks['b1'], (6, 19)))
      np.testing.assert_array_equal(
        np.asarray(masks['w2']), np.broadcast_to(np.asarray(masks['b1'])[:, None], (19, 5))
      )

"""FLOPs accounting: dense counts by hand, sparse inference and training fractions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from prunax import flops


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME')(x)  # (2, 5, 5, 8)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def _half_zero(params):
  return jax.tree.map(lambda a: a.at[..., : a.shape[-1] // 2].set(0) if a.ndim >= 2 else a, params)


def test_dense_and_conv_hand_counts():
  x = jnp.ones((2, 10, 10, 3))
  model = ConvNet()
  params = model.init(jax.random.PRNGKey(0), x)
  counter = flops.FlopsCounter(model.apply, params, x)
  conv = 2 * (2 * 5 * 5 * 8) * (3 * 3 * 3)  # 2 * outputs * (kh * kw * cin)
  dense = 2 * 2 * 200 * 10  # 2 * batch * in * out
  assert counter.per_layer == {'params/Conv_0/kernel': conv, 'params/Dense_0/kernel': dense}
  assert counter.dense_flops == conv + dense
  assert counter.inference_fraction(params) == 1.0

  sparse = _half_zero(params)  # both kernels at density 0.5
  assert counter.inference_fraction(sparse) == pytest.approx(0.5)
  only_dense = jax.tree.map(lambda a: a, params)
  only_dense['params']['Dense_0']['kernel'] = sparse['params']['Dense_0']['kernel']
  assert counter.inference_fraction(only_dense) == pytest.approx(
    (conv + 0.5 * dense) / (conv + dense)
  )
  # Training: the conv's input is data (no input gradient); the dense layer has all three.
  assert counter.training_fraction(sparse) == pytest.approx(0.5)
  expected = (conv * (0.5 + 1.0) + dense * (0.5 + 0.5 + 1.0)) / (2 * conv + 3 * dense)
  assert counter.training_fraction(sparse, backward_params=params) == pytest.approx(expected)

  averager = flops.TrainingFlopsAverager(counter)
  averager.add(params)
  averager.add(sparse)
  assert averager.fraction == pytest.approx(0.75)
  assert averager.steps == 2


def test_einsum_grouped_conv_scan_and_unnamed_contractions():
  w = jnp.ones((4, 6))
  k = jnp.ones((3, 3, 2, 6))  # feature_group_count=2: cin per group = 2

  def apply(params, x):
    h = jnp.einsum('bi,io->bo', x, params['w'])  # 2 * 5 * 4 * 6
    img = h.reshape(5, 1, 2, 3).repeat(2, axis=-1)[..., :4]  # (5, 1, 2, 4)
    y = jax.lax.conv_general_dilated(
      img,
      params['k'],
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=2,
    )  # out (5, 1, 2, 6)
    scores = jnp.einsum('bi,bj->bij', h, h)  # no parameter operand: 2 * 5 * 6 * 6 * 1

    def body(c, _):
      return c @ params['w2'], None

    c, _ = jax.lax.scan(body, h, None, length=3)  # 3 * 2 * 5 * 6 * 6
    return y.sum() + scores.sum() + c.sum()

  params = {'w': w, 'k': k, 'w2': jnp.ones((6, 6))}
  counter = flops.FlopsCounter(apply, params, jnp.ones((5, 4)))
  assert counter.per_layer == {
    'k': 2 * (5 * 1 * 2 * 6) * (3 * 3 * 2),
    'w': 2 * 5 * 4 * 6,
    'contraction_0': 2 * 5 * 6 * 6,
    'w2': 3 * 2 * 5 * 6 * 6,
  }
  half = dict(params, w2=params['w2'].at[:3].set(0))
  total = counter.dense_flops
  assert counter.inference_fraction(half) == pytest.approx(
    1 - 0.5 * counter.per_layer['w2'] / total
  )

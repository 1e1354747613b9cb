"""N:M on leaves whose group axis is not a multiple of m: a ValueError naming the value.

jaxpruner's MNIST colab applies ``nm_1,4`` to a CNN whose head kernel is ``(256, 10)``;
jaxpruner groups along the last axis (10 weights, not a multiple of 4) and raises
``ValueError('The target axis 1 is not divisible by M')``. prunax raises too, naming the
leaf and how to leave it dense.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunax
from prunax import selection
from prunax.compat import jaxpruner as jp


def _head_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(11))
  return {
    'Dense_0': {'kernel': jax.random.normal(k1, (12, 8)), 'bias': jnp.zeros(8)},
    'Dense_1': {'kernel': jax.random.normal(k2, (8, 10)), 'bias': jnp.zeros(10)},
  }


def test_nbym_mask_on_indivisible_axis_names_the_size():
  # NByM(1, 4) groups along axis -2 by default: 6 rows are not groups of 4.
  with pytest.raises(ValueError, match=r'shape \(6, 8\) has size 6, which is not divisible by m=4'):
    prunax.NByM(1, 4).mask(jnp.ones((6, 8)), 0.75)
  with pytest.raises(ValueError, match=r'has size 10, which is not divisible by m=4'):
    prunax.NByM(2, 4, axis=-1).mask(jnp.ones((8, 10)), 0.5)
  with pytest.raises(ValueError, match=r'axis 3 is out of range'):
    prunax.NByM(2, 4, axis=3).mask(jnp.ones((8, 8)), 0.5)


def test_n_by_m_mask_function_checks_its_arguments():
  with pytest.raises(ValueError, match=r'shape \(3, 6\) has size 6, which is not divisible by m=4'):
    selection.n_by_m_mask(jnp.ones((3, 6)), 2, 4, axis=-1)
  with pytest.raises(ValueError, match=r'axis -3 is out of range for scores of shape \(3, 8\)'):
    selection.n_by_m_mask(jnp.ones((3, 8)), 2, 4, axis=-3)
  with pytest.raises(ValueError, match=r'n=5, m=4'):
    selection.n_by_m_mask(jnp.ones((3, 8)), 5, 4, axis=-1)
  # A valid call: scores 0..7 in two groups of 4 along the last axis, keep the top 1.
  keep = np.asarray(selection.n_by_m_mask(jnp.arange(8.0).reshape(1, 8), 1, 4, axis=-1))
  np.testing.assert_array_equal(keep, [[0, 0, 0, 1, 0, 0, 0, 1]])


def test_colab_nm_cell_names_the_head_and_the_fix():
  # jaxpruner's colab cell: magnitude, nm_1,4, erk at 0.9, instant_sparsify.
  cfg = {'algorithm': 'magnitude', 'sparsity': 0.9, 'dist_type': 'erk', 'sparsity_type': 'nm_1,4'}
  updater = jp.create_updater_from_config(dict(cfg))
  with pytest.raises(ValueError, match=r"'Dense_1/kernel' with shape \(8, 10\) has size 10") as e:
    updater.instant_sparsify(_head_params())
  assert 'filter_fn' in str(e.value)


def test_colab_nm_cell_with_the_suggested_filter():
  cfg = {'algorithm': 'magnitude', 'sparsity': 0.9, 'dist_type': 'erk', 'sparsity_type': 'nm_1,4'}
  cfg['filter_fn'] = lambda key, p: p.ndim > 1 and p.shape[-1] % 4 == 0
  sparse, masks = jp.create_updater_from_config(cfg).instant_sparsify(_head_params())
  # Dense_0 (12, 8): one kept in each group of 4 along the last axis, 96 / 4 = 24 kept.
  assert int(jnp.sum(sparse['Dense_0']['kernel'] != 0)) == 24
  assert (np.asarray(masks['Dense_0']['kernel']).reshape(12, 2, 4).sum(-1) == 1).all()
  assert masks['Dense_1']['kernel'] is None
  assert int(jnp.sum(sparse['Dense_1']['kernel'] == 0)) == 0


def test_prunax_default_axis_takes_the_head():
  # prunax groups along a kernel's input axis (-2): the (8, 10) head has 8 rows = 2 groups.
  pruner = prunax.MagnitudePruning(sparsity_type=prunax.NByM(1, 4))
  sparse, _ = pruner.instant_sparsify(_head_params())
  kept = np.asarray(sparse['Dense_1']['kernel'] != 0)
  assert (kept.reshape(2, 4, 10).sum(1) == 1).all()


def test_nbym_mask_with_no_sparsity_is_its_own():
  # jaxpruner's activation-sparsity project calls topk_fn(y, None) for N:M: N:M's own 1 - n/m.
  scores = jnp.array([[4.0, 1.0, 3.0, 2.0], [0.5, 0.25, 2.0, 1.0]])
  keep = np.asarray(prunax.NByM(2, 4, axis=-1).mask(scores, None))
  np.testing.assert_array_equal(keep, [[1, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(keep, np.asarray(prunax.NByM(2, 4, axis=-1).mask(scores, 0.5)))

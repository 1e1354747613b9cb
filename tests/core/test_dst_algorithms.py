"""Dynamic sparse training methods papers compare against: each rule on a hand-checkable
example (SNFS, MEST, GraNet, AC/DC, N:M drop and grow), RigL's skipped gradient step on
mask updates, and one run of each in ``prunax compare``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import cli
from prunax import sparsity_schedules as sched
from prunax.algorithms import AlternatingSchedule
from prunax.algorithms import snfs as snfs_lib
from tests.core.helpers import loops_in
from tests.core.helpers import mlp_params
from tests.core.helpers import run


def _state(updater, params):
  return updater.wrap_optax(optax.sgd(0.0)).init(params)


def _top(scores, k, among=None):
  """Bool mask of the k largest scores (lowest index first on ties) within ``among``."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  if among is not None:
    scores = np.where(np.asarray(among).reshape(-1), scores, -np.inf)
  out = np.zeros(scores.size, bool)
  out[np.argsort(-scores, kind='stable')[:k]] = True
  return out


# --------------------------------------------------------------------------------- MEST


def test_mest_drops_by_weight_plus_gradient_magnitude():
  w = jnp.asarray([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0]])
  g = jnp.asarray([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]])
  old = w != 0  # 6 active
  mest = prunax.MEST(sparsity=0.25, drop_fraction=0.5, drop_fraction_fn='constant', grad_weight=1.0)
  new = np.asarray(
    mest.compute_masks({'w': w}, {'w': 0.25}, _state(mest, {'w': w}), {'w': g}, {'w': old})['w']
  ).reshape(-1)
  # floor(0.5 * 6) = 3 dropped: scores |w| + |g| = 1.0, .2, .3, .4, .5, .6 keep w0, w4, w5
  # (by |w| alone w0 would go); 3 grown at random among the other 5.
  kept = _top(np.abs(w) + np.abs(g), 3, among=old)
  np.testing.assert_array_equal(kept, [1, 0, 0, 0, 1, 1, 0, 0])
  assert (new[kept]).all() and new.sum() == 6
  with pytest.raises(ValueError, match='grad_weight must be >= 0'):
    prunax.MEST(sparsity=0.5, grad_weight=-1.0, drop_fraction_fn='constant')


# ------------------------------------------------------------------------------- GraNet


def test_granet_prunes_to_the_schedule_then_regrows_by_gradient():
  w = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]])
  g = jnp.asarray([[9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
  granet = prunax.GraNet(
    sparsity=0.5,
    drop_fraction=0.4,
    drop_fraction_fn='constant',
    scheduler=sched.PolynomialSchedule(1, 0, 4),
  )
  state = _state(granet, {'w': w})
  assert bool(prunax.bool_masks(state, {'w': w})['w'].all())  # dense start
  new = np.asarray(
    granet.compute_masks({'w': w}, {'w': 0.5}, state, {'w': g}, {'w': jnp.ones_like(w, bool)})['w']
  ).reshape(-1)
  # 5 stay active at sparsity 0.5; floor(0.4 * 5) = 2 of them are replaced: keep the 3
  # largest |w| (w7..w9) and grow the 2 largest |g| among the rest (w0, w1), at zero.
  np.testing.assert_array_equal(new, [1, 1, 0, 0, 0, 0, 0, 1, 1, 1])
  params = mlp_params()
  updater = prunax.GraNet(
    sparsity=0.75, drop_fraction=0.3, scheduler=sched.PolynomialSchedule(2, 0, 6)
  )
  p, _, _ = run(updater.wrap_optax(optax.sgd(0.05)), params, 8)
  kernel = np.asarray(p['layer0']['kernel'])
  assert (kernel == 0).sum() == round(0.75 * kernel.size)


# -------------------------------------------------------------------------------- AC/DC


def test_acdc_alternates_sparse_and_dense_phases():
  schedule = AlternatingSchedule(update_freq=2, update_start_step=3, update_end_step=11)
  sparse = [bool(schedule.is_sparse(t)) for t in range(14)]
  # dense warm-up 0-2; sparse 3-4, dense 5-6, sparse 7-8, dense 9-10; sparse from 11 on.
  assert sparse == [False] * 3 + [True] * 2 + [False] * 2 + [True] * 2 + [False] * 2 + [True] * 3
  updates = [t for t in range(14) if bool(schedule.is_update_step(t))]
  assert updates == [3, 5, 7, 9, 11]
  assert float(schedule.sparsity(4, 0.8)) == pytest.approx(0.8)
  assert float(schedule.sparsity(5, 0.8)) == 0.0
  with pytest.raises(ValueError, match='update_freq must be an integer >= 1'):
    AlternatingSchedule(update_freq=0)

  params = mlp_params()
  acdc = prunax.create_updater_from_config(
    {
      'algorithm': 'acdc',
      'sparsity': 0.5,
      'update_freq': 2,
      'update_start_step': 1,
      'update_end_step': 7,
    }
  )
  assert acdc.scheduler == AlternatingSchedule(2, 1, 7)
  _, _, history = run(acdc.wrap_optax(optax.sgd(0.1)), params, 9)
  n = params['layer0']['kernel'].size
  for t, (p, _) in enumerate(history):
    zeros = int((np.asarray(p['layer0']['kernel']) == 0).sum())
    if bool(acdc.scheduler.is_sparse(t)):
      assert zeros == n // 2, t
    elif t > 0 and bool(acdc.scheduler.is_update_step(t)):
      assert zeros == n // 2, t  # revived weights start at zero...
    else:
      assert zeros < n // 4, t  # ...and train again in the rest of the dense phase
  # The mask of a sparse phase is the top half by magnitude of the weights at its start.
  before = history[0][0]['layer0']['kernel']  # params the model saw at step 1
  mask1 = np.asarray(history[1][0]['layer0']['kernel']) != 0
  np.testing.assert_array_equal(mask1.reshape(-1), _top(np.abs(before), n // 2))


# --------------------------------------------------------------------- N:M drop and grow


def _nm_reference(old, w, g, fraction, n, m):
  """Drop floor(f * n_active) smallest |w| leaf-wide, refill each group (along axis -2)
  to n with the largest |g| among the others (numpy, one (k, 1) kernel)."""
  old, w, g = (np.asarray(x).reshape(-1) for x in (old, w, g))
  n_active = int(old.sum())
  kept = _top(np.abs(w), n_active - int(np.float32(fraction) * np.float32(n_active)), old)
  out = kept.copy()
  for start in range(0, old.size, m):
    group = slice(start, start + m)
    free = n - int(kept[group].sum())
    cand = np.where(kept[group], -np.inf, np.abs(g[group]))
    out[start + np.argsort(-cand, kind='stable')[:free]] = True
  return out


def test_nm_rigl_drops_and_grows_within_groups():
  # An (8, 1) kernel: two groups of 4 along the input axis, 2:4 active.
  w = jnp.asarray([0.9, 0.1, 0.0, 0.0, 0.8, 0.0, 0.7, 0.0]).reshape(8, 1)
  g = jnp.asarray([0.0, 0.0, 3.0, 2.0, 0.0, 1.0, 0.0, 4.0]).reshape(8, 1)
  old = w != 0
  rigl = prunax.NMRigL(drop_fraction=0.5, drop_fraction_fn='constant')
  new = np.asarray(
    rigl.compute_masks({'w': w}, {'w': 0.5}, _state(rigl, {'w': w}), {'w': g}, {'w': old})['w']
  ).reshape(-1)
  # floor(0.5 * 4) = 2 dropped leaf-wide: w1 (0.1) and w6 (0.7); group 0 regrows w2 (|g| 3),
  # group 1 regrows w7 (|g| 4).
  np.testing.assert_array_equal(new, [1, 0, 1, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(new, _nm_reference(old, w, g, 0.5, 2, 4))
  with pytest.raises(ValueError, match='supports only N:M sparsity'):
    prunax.NMRigL(sparsity_type='unstructured', drop_fraction_fn='constant')
  with pytest.raises(ValueError, match='supports only unstructured'):
    prunax.RigL(sparsity=0.5, sparsity_type='nm_2,4', drop_fraction_fn='constant')


def test_nm_set_keeps_its_kept_weights_above_the_largest_random_key():
  # SET's random keys (selection.hash_keys) fill the upper half of uint32, 2**32 - 1
  # included; N:M drop-and-grow ranks its kept weights at 2**32 - 1 in their groups, so
  # a grow key of that value tied with them and, earlier in its group, won (ties go to
  # the lowest position). Every key at 2**32 - 1 here: the kept weights must stay.
  class MaxKeys(prunax.NMSET):
    def grow_scores(self, params, sparse_state, grads):
      return jax.tree.map(lambda w: jnp.full(w.shape, 2**32 - 1, jnp.uint32), params)

  # An (8, 1) kernel: two groups of 4 along the input axis, 2:4 active, at the group ends.
  w = jnp.asarray([0.0, 0.0, 0.9, 0.5, 0.0, 0.0, 0.8, 0.7]).reshape(8, 1)
  old = w != 0
  nm = MaxKeys(drop_fraction=0.5, drop_fraction_fn='constant')
  new = np.asarray(
    nm.compute_masks({'w': w}, {'w': 0.5}, _state(nm, {'w': w}), None, {'w': old})['w']
  )
  # floor(0.5 * 4) = 2 dropped (0.5, 0.7); 0.9 and 0.8 kept; each group regrows its first
  # free position.
  np.testing.assert_array_equal(new.reshape(-1), [1, 0, 1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize('name', ['nm_set', 'nm_rigl'])
def test_nm_drop_and_grow_keeps_the_pattern_in_training(name):
  params = mlp_params()
  updater = prunax.create_updater_from_config(
    {
      'algorithm': name,
      'sparsity': 0.5,
      'sparsity_type': 'nm_2,4',
      'update_freq': 2,
      'update_end_step': 8,
    }
  )
  p, state, _ = run(updater.wrap_optax(optax.adam(1e-2)), params, 6)
  masks = prunax.bool_masks(state, params)
  for leaf in ('layer0', 'layer1'):
    m = np.asarray(masks[leaf]['kernel'])
    assert (np.moveaxis(m, -2, -1).reshape(-1, 4).sum(-1) == 2).all()
    assert not np.asarray(p[leaf]['kernel'])[~m].any()


# --------------------------------------------------------------------------------- SNFS


def test_redistribute_caps_and_hands_out_the_rest():
  got = snfs_lib.redistribute(
    jnp.int32(10), jnp.asarray([1.0, 1.0, 0.0]), jnp.asarray([2, 20, 5], jnp.int32)
  )
  np.testing.assert_array_equal(np.asarray(got), [2, 8, 0])
  got = snfs_lib.redistribute(
    jnp.int32(7), jnp.asarray([3.0, 1.0]), jnp.asarray([10, 10], jnp.int32)
  )
  assert int(got.sum()) == 7 and int(got[0]) >= 5


def test_snfs_momentum_redistribution_and_growth():
  wa = jnp.asarray([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
  wb = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0]])
  params = {'a': wa, 'b': wb}
  old = {'a': wa != 0, 'b': wb != 0}
  snfs = prunax.SNFS(sparsity=0.5, drop_fraction=0.5, drop_fraction_fn='constant', momentum=0.9)
  state = _state(snfs, params)
  # The momentum: m <- 0.9 m + g of the dense gradients, every step.
  g = {'a': jnp.full((1, 8), 2.0), 'b': jnp.ones((1, 8))}
  aux = snfs.update_algorithm_state(
    snfs.update_algorithm_state(state.algorithm_state, g, old), g, old
  )
  np.testing.assert_allclose(np.asarray(aux.momentum['a']), 0.9 * 2.0 + 2.0)
  # Mean |m| over active weights: a 3, b 1; each removes ceil(0.5 * 4) = 2 (smallest |w|),
  # the 4 removed go back 3 to a and 1 to b, at the largest |m| among inactive positions.
  ma = jnp.asarray([[3.0, 3.0, 3.0, 3.0, 0.5, 2.0, 1.0, 0.1]])
  mb = jnp.asarray([[0.7, 0.2, 0.3, 0.1, 1.5, 1.5, 0.5, 0.5]])
  state = state._replace(algorithm_state=snfs_lib.SnfsState({'a': ma, 'b': mb}))
  new = snfs.compute_masks(params, {'a': 0.5, 'b': 0.5}, state, g, old)
  # a keeps w0, w1 and grows the 3 largest |m| among the rest: w2 (3), w3 (3), w5 (2).
  np.testing.assert_array_equal(np.asarray(new['a']).reshape(-1), [1, 1, 1, 1, 0, 1, 0, 0])
  # b keeps w4, w5 and grows 1: w0 (0.7).
  np.testing.assert_array_equal(np.asarray(new['b']).reshape(-1), [1, 0, 0, 0, 1, 1, 0, 0])
  # Training keeps the total count while leaves' densities move.
  params = mlp_params()
  updater = prunax.SNFS(sparsity=0.8, scheduler=sched.PeriodicSchedule(2, 0, 8))
  _, state, _ = run(updater.wrap_optax(optax.sgd(0.1, momentum=0.9)), params, 6)
  counts = [int(m.sum()) for m in jax.tree.leaves(prunax.bool_masks(state, params))]
  sizes = [params['layer0']['kernel'].size, params['layer1']['kernel'].size]
  assert sum(counts) == sum(s - round(0.8 * s) for s in sizes)


def test_snfs_treats_each_layer_of_a_stacked_leaf_as_a_tensor():
  # A scanned model gets the masks of its unrolled form. Pruned as one tensor, the stack
  # dropped its smallest weights across layers (never from layer 0, whose weights are 10x
  # larger) and shared one regrowth: layers 0 and 1 ended 18% and 14% dense here, where
  # the unrolled model's end 14% and 24%.
  layers, d = 4, 32
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  w = jax.random.normal(k[0], (d, layers, d)).at[:, 0].multiply(10.0)  # layer axis 1
  m = jax.random.normal(k[1], (d, layers, d)) * jnp.arange(1.0, layers + 1)[None, :, None]
  old = jax.random.uniform(k[2], (d, layers, d)) < jnp.asarray([0.2, 0.3, 0.1, 0.25])[:, None]
  head = (jax.random.normal(k[3], (d, 12)), jax.random.normal(k[4], (d, 12)))
  head_old = jax.random.uniform(k[5], (d, 12)) < 0.3

  def masks(axes, tree):
    params, momentum, old_masks = (tree(w, head[0]), tree(m, head[1]), tree(old, head_old))
    snfs = prunax.SNFS(sparsity=0.8, drop_fraction_fn='constant', layer_axes=axes)
    state = _state(snfs, params)._replace(algorithm_state=snfs_lib.SnfsState(momentum))
    sparsities = jax.tree.map(lambda _: 0.8, params)
    compute = jax.jit(lambda p, s, o: snfs.compute_masks(p, sparsities, s, None, o))
    return compute(params, state, old_masks)

  stacked = masks({'layers/kernel': 1}, lambda x, h: {'layers': {'kernel': x}, 'head': h})
  flat = masks(
    None, lambda x, h: {'head': h, **{f'layer{i}': {'kernel': x[:, i]} for i in range(layers)}}
  )
  np.testing.assert_array_equal(stacked['head'], flat['head'])
  for i in range(layers):
    np.testing.assert_array_equal(stacked['layers']['kernel'][:, i], flat[f'layer{i}']['kernel'])
  # The total count is kept, and the layers' densities moved apart (redistribution ran).
  total = int(old.sum() + head_old.sum())
  assert int(stacked['layers']['kernel'].sum() + stacked['head'].sum()) == total
  densities = np.asarray(stacked['layers']['kernel']).mean(axis=(0, 2))
  assert not np.allclose(densities, np.asarray(old).mean(axis=(0, 2)))


@pytest.mark.parametrize('leaves', [2, 9])
@pytest.mark.parametrize(
  'make, loops',
  [
    # One selection drops from every leaf and one grows in every leaf (each one loop
    # that also breaks its ties), and the redistribution loops over the leaves twice.
    (lambda: prunax.SNFS(sparsity=0.75, drop_fraction_fn='constant'), 4),
    # SET's grow keys are distinct (selection.hash_keys): its grow search never ties and
    # its loop carries no tie search. RigL's gradient scores may tie.
    (lambda: prunax.SET(sparsity=0.75, drop_fraction_fn='constant'), 2),
    (lambda: prunax.MEST(sparsity=0.75, drop_fraction_fn='constant'), 2),
    (lambda: prunax.RigL(sparsity=0.75, drop_fraction_fn='constant'), 2),
    # One selection drops from every leaf; N:M growth is per group, no loop.
    (lambda: prunax.NMSET(drop_fraction_fn='constant'), 1),
  ],
  ids=['snfs', 'set', 'mest', 'rigl', 'nm_set'],
)
def test_a_mask_update_runs_the_same_loops_for_any_number_of_leaves(make, loops, leaves):
  # A selection per leaf (two loops each) compiled SNFS's step of 64 layers of 256 x 256
  # in 58 s, 55x the dense step's (now 9.6 s), and N:M SET's of 16 layers in 4.8 s.
  params = mlp_params(sizes=(48,) * (leaves + 1))  # kernels of 2304 weights: searched
  updater = make()
  state = _state(updater, params)
  old = prunax.bool_masks(state, params)
  sparsities = jax.tree.map(lambda m: None if m is None else updater.sparsity, old)
  jaxpr = jax.make_jaxpr(lambda p, s: updater.compute_masks(p, sparsities, s, p, old))(
    params, state
  )
  assert loops_in(jaxpr.jaxpr) == loops


@pytest.mark.parametrize('leaves', [2, 9])
@pytest.mark.parametrize('make', [prunax.SET, prunax.RigL], ids=['set', 'rigl'])
def test_drop_and_grow_counts_of_alike_leaves_are_traced_once(make, leaves):
  # Leaves of one size at one sparsity (the schedule's value, shared by every leaf of one
  # target) share their keep and drop counts: one floor of the drop fraction's product
  # however many leaves, where every leaf traced its own (and topk_masks clipped each).
  params = mlp_params(sizes=(48,) * (leaves + 1))
  updater = make(sparsity=0.75, drop_fraction_fn='constant')
  state = _state(updater, params)
  old = prunax.bool_masks(state, params)
  sparsities = jax.tree.map(lambda m: None if m is None else updater.sparsity, old)
  jaxpr = jax.make_jaxpr(lambda p, s: updater.compute_masks(p, sparsities, s, p, old))(
    params, state
  )
  assert str(jaxpr).count(' floor ') == 1, str(jaxpr).count(' floor ')


def test_set_grows_from_the_expected_quantiles_of_its_keys():
  # SET's grow keys are uniform (selection.hash_keys), and size - n_keep of them compete
  # for n_drop places: its grow search starts at their expected quantiles (no sample),
  # so the first pass leaves about sqrt(n_drop) keys in the bracket. A sample of 2048
  # (before) left thousands: 13-38 thousand on the benchmark MLP's 2048 x 2048 kernel.
  w = jax.random.normal(jax.random.PRNGKey(0), (1024, 512))
  params = {'w': w}
  updater = prunax.SET(sparsity=0.8, drop_fraction=0.3, drop_fraction_fn='constant')
  state = _state(updater, params)
  old = prunax.bool_masks(state, params)
  with prunax.selection.count_passes() as log:
    new = jax.jit(lambda p, s: updater.compute_masks(p, {'w': 0.8}, s, p, old))(params, state)
    jax.block_until_ready(new)
    jax.effects_barrier()
  assert int(new['w'].sum()) == int(old['w'].sum())
  n_active = w.size - int(0.8 * w.size)  # the mask's exact count
  n_drop = int(np.floor(np.float32(0.3) * n_active))
  m = w.size - (n_active - n_drop)
  grow = max(r.loop for r in log)  # the last loop traced: drop, grow
  first = [r for r in log if r.loop == grow]
  sigma = np.sqrt(n_drop * (1 - n_drop / m))
  assert first[0].keys == w.size
  assert len(first) == 1 or first[1].keys <= 4 * sigma + 16, (first, sigma)


# ----------------------------------------------------------- RigL: no step on mask updates


@pytest.mark.parametrize('name', ['rigl', 'set'])
def test_rigl_skips_the_gradient_step_on_mask_updates(name):
  params = mlp_params()
  cls = {'rigl': prunax.RigL, 'set': prunax.SET}[name]
  updater = cls(
    sparsity=0.5,
    drop_fraction=0.3,
    drop_fraction_fn='constant',
    scheduler=sched.PeriodicSchedule(2),
  )
  tx = updater.wrap_optax(optax.sgd(0.1))
  _, _, history = run(tx, params, 2)
  old = prunax.bool_masks(tx.init(params), params)['layer0']['kernel']
  (p1, s1), (p2, s2) = history
  new = np.asarray(prunax.bool_masks(s1, params)['layer0']['kernel'])
  stay = np.asarray(old) & new
  w0 = np.asarray(params['layer0']['kernel'])
  w1 = np.asarray(p1['layer0']['kernel'])
  if name == 'rigl':  # Step 0 updates the masks: kept weights do not move, biases neither.
    np.testing.assert_array_equal(w1[stay], w0[stay])
    np.testing.assert_array_equal(
      np.asarray(p1['layer0']['bias']), np.asarray(params['layer0']['bias'])
    )
  else:  # SET's reference applies the gradient step, then updates the masks.
    assert (w1[stay] != w0[stay]).any()
  assert not w1[~new].any()
  # Step 1 is not an update step: kept weights move by the gradient step.
  w2 = np.asarray(p2['layer0']['kernel'])
  assert (w2[new] != w1[new]).any()


# ------------------------------------------------------------------ in prunax compare


def test_new_algorithms_run_in_compare(tmp_path):
  # (nm_set / nm_rigl cannot prune the digits CNN: its first convolution has one input
  # channel, and N:M groups run along the inputs; they train in the tests above.)
  names = ['snfs', 'mest', 'granet', 'acdc']
  rc = cli.main(
    [
      'compare',
      '--quick',
      '--run-dir',
      str(tmp_path / 'run'),
      '--no-progress',
      '--no-plots',
      '--no-compile-cache',
      '--algorithms',
      ','.join(names),
      '--seeds',
      '1',
      '--steps',
      '12',
      '--set',
      'optional_algorithms=[]',
    ]
  )
  assert rc == 0
  report = (tmp_path / 'run' / 'results.md').read_text()
  for name in names:
    assert name in report

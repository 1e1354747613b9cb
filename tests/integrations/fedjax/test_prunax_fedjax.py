"""prunax_fedjax on the real FedJAX 0.0.17: FedAvg/FedProx rounds, client sparsity, checkpoints."""

import pickle
import subprocess
import sys

import pytest

fedjax = pytest.importorskip(
  'fedjax', reason='fedjax is not installed (pip install -e integrations/fedjax)'
)
prunax_fedjax = pytest.importorskip('prunax_fedjax')

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import prunax  # noqa: E402
from prunax.algorithms.autosparse import soft_threshold  # noqa: E402
from prunax_fedjax.examples import federated_digits  # noqa: E402

fed_avg = fedjax.algorithms.fed_avg
NUM_ROUNDS = 8
# Gradual schedules prune at rounds (counts) 2, 4 and 6; sparse training updates at 0, 2, 4.
SCHEDULE = dict(update_freq=2, update_start_step=2, update_end_step=6)
# Sparsity after round r (1-based; round r runs server step r - 1) for a 0.8 target with the
# cubic schedule above: 0.8 * (1 - (1 - 2/4) ** 3) = 0.7 from the update at step 4.
GRADUAL_SPARSITY = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.7, 6: 0.7, 7: 0.8, 8: 0.8}
FAMILIES = [
  'magnitude',
  'saliency',
  'random',
  'global_magnitude',
  'magnitude_ste',
  'static_sparse',
  'set',
  'rigl',
  'autosparse',
]
SPARSE_TRAINING = ('static_sparse', 'set', 'rigl')


def _mlp(batch):
  x = hk.Flatten()(batch['x'])
  return hk.Linear(10)(jax.nn.relu(hk.Linear(32)(x)))


@pytest.fixture(scope='module')
def data():
  return federated_digits.federated_digits(num_clients=50, seed=0)


@pytest.fixture(scope='module')
def model():
  sample = {'x': np.zeros((1, 8, 8, 1), np.float32), 'y': np.zeros((1,), np.int32)}
  return fedjax.create_model_from_haiku(
    hk.transform(_mlp),
    sample,
    train_loss=lambda b, logits: fedjax.metrics.unreduced_cross_entropy_loss(b['y'], logits),
    eval_metrics={'accuracy': fedjax.metrics.Accuracy()},
  )


def _pruner(algorithm, **overrides):
  if algorithm not in prunax.all_algorithm_names():
    pytest.skip(f'prunax has no {algorithm!r} algorithm yet')
  config = {'algorithm': algorithm, 'sparsity': 0.8, 'dist_type': 'uniform', **SCHEDULE}
  if algorithm in SPARSE_TRAINING:
    config['update_start_step'] = 0
  if algorithm == 'autosparse':  # the sparsity is learned; 0.0 just selects the kernels
    config = {'algorithm': algorithm, 'sparsity': 0.0, 'dist_type': 'uniform'}
  config.update(overrides)
  return prunax.create_updater_from_config(config)


def _fed_avg(model, pruner, client_optimizer=None):
  return fed_avg.federated_averaging(
    fedjax.model_grad(model),
    client_optimizer or fedjax.optimizers.sgd(0.05),
    prunax_fedjax.server_optimizer(pruner, optax.adam(1e-2)),
    fedjax.ShuffleRepeatBatchHParams(batch_size=8, num_epochs=1, seed=0),
  )


def _kernels(params):
  return [params['linear']['w'], params['linear_1']['w']]


def _masks(state):
  masks = prunax.bool_masks(state.opt_state, state.params)
  return [np.asarray(masks['linear']['w']), np.asarray(masks['linear_1']['w'])]


def _expected_zeros(sparsity, sizes, is_global):
  if is_global:
    return round(sparsity * sum(sizes))
  return [round(sparsity * n) for n in sizes]


@pytest.mark.parametrize('algorithm', FAMILIES)
def test_fed_avg_prunes_server_model_on_schedule(algorithm, data, model):
  train, _ = data
  pruner = _pruner(algorithm)
  # What the clients' gradient function sees: zeros in the kernels, per client step.
  seen = []

  def grad_fn(params, batch, rng):
    jax.debug.callback(seen.append, sum(jnp.sum(w == 0) for w in _kernels(params)))
    return fedjax.model_grad(model)(params, batch, rng)

  algo = fed_avg.federated_averaging(
    grad_fn,
    fedjax.optimizers.sgd(0.05),
    prunax_fedjax.server_optimizer(pruner, optax.adam(1e-2)),
    fedjax.ShuffleRepeatBatchHParams(batch_size=8, num_epochs=1, seed=0),
  )
  state = prunax_fedjax.sparsify_initial_state(pruner, algo.init(model.init(jax.random.PRNGKey(0))))
  sizes = [w.size for w in _kernels(state.params)]
  is_global = algorithm == 'global_magnitude'
  sampler = fedjax.client_samplers.UniformGetClientSampler(train, 5, seed=0)
  for r in range(1, NUM_ROUNDS + 1):
    broadcast_zeros = sum(int(jnp.sum(w == 0)) for w in _kernels(state.params))
    seen.clear()
    state, _ = algo.apply(state, sampler.sample())
    jax.effects_barrier()
    # Each client starts from the broadcast params; dense clients then fill the zeros.
    assert max(seen) == broadcast_zeros, r

    masks = _masks(state)
    if algorithm == 'autosparse':  # learned sparsity: clients get soft-thresholded weights
      sparse_state = prunax.get_sparse_state(state.opt_state)
      for name, w, m in zip(('linear', 'linear_1'), _kernels(state.params), masks):
        dense, s = (
          sparse_state.algorithm_state.dense_params[name]['w'],
          sparse_state.algorithm_state.thresholds[name]['w'],
        )
        np.testing.assert_array_equal(m, np.abs(dense) > jax.nn.sigmoid(s))
        assert not np.any(np.asarray(w)[m == 0])
        # (Eager vs jitted float32 arithmetic: equal up to rounding.)
        np.testing.assert_allclose(w, jnp.where(m, soft_threshold(dense, s), 0), atol=1e-7)
        assert float(s) != -5.0  # the threshold is trained on the server
      continue
    target = 0.8 if algorithm in SPARSE_TRAINING else GRADUAL_SPARSITY[r]
    mask_zeros = [int((m == 0).sum()) for m in masks]
    assert (sum(mask_zeros) if is_global else mask_zeros) == _expected_zeros(
      target, sizes, is_global
    ), r
    for w, m in zip(_kernels(state.params), masks):
      assert not np.any(np.asarray(w)[m == 0]), r  # pruned weights are exactly zero
      if algorithm not in SPARSE_TRAINING:  # (SET/RigL regrow weights at zero)
        assert np.count_nonzero(np.asarray(w)) == int(m.sum()), r

  if algorithm in ('magnitude_ste', 'autosparse'):
    # The server keeps dense weights in its optimizer state, clients got the sparse ones.
    assert sum(int((m == 0).sum()) for m in _masks(state)) > 0
    dense = prunax.get_sparse_state(state.opt_state).algorithm_state.dense_params
    for d, m in zip([dense['linear']['w'], dense['linear_1']['w']], _masks(state)):
      assert np.count_nonzero(np.asarray(d)[m == 0]) == int((m == 0).sum())


def test_fed_avg_accuracy_dense_and_sparse():
  # 24 rounds: magnitude pruning steps 6, 16, 18 (rounds 7, 17, 19) to 0, 0.796, 0.8 (ERK).
  results = federated_digits.run(
    ('no_prune', 'magnitude'), seeds=(0,), num_rounds=24, clients_per_round=5, eval_every=24
  )
  dense, sparse = results['no_prune'], results['magnitude']
  assert dense['mean_sparsity'] == 0.0
  assert sparse['mean_sparsity'] == pytest.approx(0.8, abs=1e-3)
  assert dense['mean_accuracy'] > 0.6 and sparse['mean_accuracy'] > 0.6  # chance: 0.1
  rounds = sparse['runs'][0]['rounds']
  assert [r['round'] for r in rounds] == list(range(1, 25))
  assert rounds[15]['sparsity'] == 0.0
  assert rounds[16]['sparsity'] == pytest.approx(0.8 * (1 - (1 - 10 / 12) ** 3), abs=1e-3)
  assert rounds[-1]['sparsity'] == pytest.approx(0.8, abs=1e-3)
  assert 'accuracy' in rounds[-1] and 'accuracy' not in rounds[0]


def test_fed_prox_prunes_server_model(data, model):
  train, _ = data
  pruner = _pruner('magnitude', update_start_step=0, update_end_step=0)  # one-shot at round 1
  algo = fedjax.algorithms.fed_prox.fed_prox(
    fedjax.model_per_example_loss(model),
    fedjax.optimizers.sgd(0.05),
    prunax_fedjax.server_optimizer(pruner, optax.adam(1e-2), algorithm='fed_prox'),
    fedjax.ShuffleRepeatBatchHParams(batch_size=8, num_epochs=1, seed=0),
    proximal_weight=0.1,
  )
  state = algo.init(model.init(jax.random.PRNGKey(0)))
  state, _ = algo.apply(
    state, fedjax.client_samplers.UniformGetClientSampler(train, 5, seed=0).sample()
  )
  for w in _kernels(state.params):
    assert np.count_nonzero(np.asarray(w)) == w.size - round(0.8 * w.size)


@pytest.mark.parametrize('name', ['mime', 'mime_lite'])
def test_mime_raises_clear_error(name):
  with pytest.raises(ValueError, match=f'fedjax.algorithms.{name} .*discarding the params'):
    prunax_fedjax.server_optimizer(_pruner('magnitude'), optax.sgd(0.1), algorithm=name)


def test_server_algorithm_is_an_explicit_argument(model):
  with pytest.raises(ValueError, match=r"Unknown FedJAX algorithm 'fedavg'; valid names are \["):
    prunax_fedjax.server_optimizer(_pruner('magnitude'), optax.sgd(0.1), algorithm='fedavg')
  # The algorithms that broadcast the server optimizer's params exist in FedJAX.
  for name in prunax_fedjax.optimizers.SERVER_ALGORITHMS:
    assert hasattr(fedjax.algorithms, name), name
  server_opt = prunax_fedjax.server_optimizer(
    _pruner('magnitude'), optax.sgd(0.1), algorithm='fed_prox'
  )
  assert prunax.get_sparse_state(server_opt.init(model.init(jax.random.PRNGKey(0)))) is not None


def test_client_sparsity_deltas_zero_outside_mask(data, model):
  train, _ = data
  pruner = _pruner('magnitude', update_start_step=0, update_end_step=0)
  client_opt = prunax_fedjax.client_optimizer(pruner, optax.sgd(0.05))
  algo = _fed_avg(model, pruner, client_opt)
  sampler = fedjax.client_samplers.UniformGetClientSampler(train, 5, seed=0)
  state = algo.init(model.init(jax.random.PRNGKey(0)))
  for _ in range(3):
    state, _ = algo.apply(state, sampler.sample())
  masks = _masks(state)
  assert [float((m == 0).mean()) for m in masks] == pytest.approx([0.8, 0.8], abs=1e-3)

  # FedAvg's own client training, as the next round runs it.
  train_clients = fed_avg.create_train_for_each_client(fedjax.model_grad(model), client_opt)
  hparams = fedjax.ShuffleRepeatBatchHParams(batch_size=8, num_epochs=1, seed=0)
  clients = [(cid, cds.shuffle_repeat_batch(hparams), rng) for cid, cds, rng in sampler.sample()]
  upload = prunax_fedjax.update_size(state.params)
  for _, delta in train_clients(state.params, clients):
    for d, m in zip(_kernels(delta), masks):
      assert not np.any(np.asarray(d)[m == 0])
      assert np.count_nonzero(np.asarray(d)[m == 1]) > 0.5 * m.sum()
    assert np.count_nonzero(np.asarray(delta['linear']['b'])) > 0  # biases are not pruned
    size = prunax_fedjax.update_size(delta)
    assert size['nonzero'] <= upload['nonzero'] and size['sparse_bytes'] < size['dense_bytes']

  diag = prunax_fedjax.round_diagnostics(state.params, client_sparsity=True)
  assert diag['sparsity'] == pytest.approx(0.8, abs=1e-3)
  assert diag['upload_sparse_bytes'] == upload['nonzero'] * 8
  assert diag['upload_dense_bytes'] == 4 * (64 * 32 + 32 + 32 * 10 + 10)


def test_client_sparsity_rejects_drop_and_grow():
  with pytest.raises(ValueError, match='regrown weights start at exactly zero'):
    prunax_fedjax.client_optimizer(_pruner('rigl'), optax.sgd(0.1))


def test_update_size_counts_values_and_indices():
  tree = {'a': jnp.array([[0.0, 1.0], [2.0, 0.0]]), 'b': jnp.zeros(3, jnp.bfloat16)}
  assert prunax_fedjax.update_size(tree) == {
    'dense_bytes': 4 * 4 + 3 * 2,
    'sparse_bytes': 2 * (4 + 4),
    'nonzero': 2,
    'size': 7,
  }


def _leaves_bytes(state):
  return fedjax.serialization.msgpack_serialize(
    [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
  )


def _from_bytes(template, blob):
  leaves = fedjax.serialization.msgpack_deserialize(blob)
  return jax.tree_util.tree_unflatten(
    jax.tree_util.tree_structure(template), [jnp.asarray(x) for x in leaves]
  )


@pytest.mark.parametrize('algorithm', ['magnitude', 'set', 'rigl', 'magnitude_ste', 'autosparse'])
def test_server_state_save_restore_mid_schedule(algorithm, data, model, tmp_path):
  train, _ = data
  pruner = _pruner(algorithm)
  algo = _fed_avg(model, pruner)
  init = algo.init(model.init(jax.random.PRNGKey(0)))
  state = prunax_fedjax.sparsify_initial_state(pruner, init)
  for r in range(5):  # mid-schedule: masks updated at rounds 3 and 5 (steps 2, 4), not yet 7
    state, _ = algo.apply(
      state,
      fedjax.client_samplers.UniformGetClientSampler(train, 5, seed=0, start_round_num=r).sample(),
    )

  restored_msgpack = _from_bytes(init, _leaves_bytes(state))
  restored_pickle = pickle.loads(pickle.dumps(jax.device_get(state)))
  prunax_fedjax.save_server_state(tmp_path / 'server_state', state)
  restored_file = prunax_fedjax.restore_server_state(tmp_path / 'server_state', init)
  for restored in (restored_msgpack, restored_pickle, restored_file):
    sparse = prunax.get_sparse_state(restored.opt_state)
    assert sparse.count.dtype == np.int32 and int(sparse.count) == 5
    assert sparse.rng.dtype == np.uint32
  runs = []
  for s in (state, restored_msgpack, restored_pickle, restored_file):
    for r in range(5, NUM_ROUNDS):
      s, _ = algo.apply(
        s,
        fedjax.client_samplers.UniformGetClientSampler(
          train, 5, seed=0, start_round_num=r
        ).sample(),
      )
    runs.append(jax.tree_util.tree_leaves(s))
  assert int(prunax.get_sparse_state(s.opt_state).count) == NUM_ROUNDS
  for other in runs[1:]:
    assert len(other) == len(runs[0])
    for a, b in zip(runs[0], other):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_pruner_config_fails_before_first_round(model):
  with pytest.raises(ValueError, match='sparsity'):
    prunax.create_updater_from_config({'algorithm': 'magnitude', 'sparsity': 1.5})
  with pytest.raises(TypeError, match='prunax algorithm'):
    prunax_fedjax.server_optimizer('magnitude', optax.adam(1e-3))


def test_unknown_custom_sparsity_map_fails_at_init(model):
  pruner = prunax.MagnitudePruning(sparsity_distribution_fn={'linear/w': 0.5, 'conv/w': 0.9})
  algo = _fed_avg(model, pruner)
  with pytest.raises(ValueError, match="'conv/w' matches no parameter"):
    algo.init(model.init(jax.random.PRNGKey(0)))


def test_restores_jax_tree_map_only_when_missing(monkeypatch):
  from prunax_fedjax import _compat

  monkeypatch.delattr(jax, 'tree_map', raising=False)
  assert _compat.jax_tree_map_needed()
  assert _compat.restore_jax_tree_map() is True and jax.tree_map is jax.tree_util.tree_map
  # Real FedJAX code that calls jax.tree_map.
  zeros = fedjax.tree_util.tree_zeros_like({'w': jnp.ones(3)})
  np.testing.assert_array_equal(zeros['w'], np.zeros(3))
  assert not _compat.jax_tree_map_needed()
  assert _compat.restore_jax_tree_map() is False  # present now: left alone
  sentinel = object()
  monkeypatch.setattr(jax, 'tree_map', sentinel)
  assert _compat.restore_jax_tree_map() is False and jax.tree_map is sentinel


_TREE_MAP_CHILD = """
import jax, optax, prunax, prunax_fedjax
import fedjax, jax.numpy as jnp
missing = not hasattr(jax, 'tree_map')
print('needed', missing, prunax_fedjax.jax_tree_map_needed())
try:
  fedjax.tree_util.tree_zeros_like({'w': jnp.ones(3)})
  print('stock fedjax runs')
except AttributeError as e:
  print('stock fedjax fails:', e)
prunax_fedjax.server_optimizer(prunax.MagnitudePruning(sparsity=0.5), optax.sgd(0.1))
print('restored', jax.tree_map is jax.tree_util.tree_map)
fedjax.tree_util.tree_zeros_like({'w': jnp.ones(3)})
"""


def test_fedjax_breaks_without_the_fix_and_import_patches_nothing():
  proc = subprocess.run(
    [sys.executable, '-c', _TREE_MAP_CHILD], capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  if 'needed False False' in proc.stdout:
    pytest.skip(f'jax {jax.__version__} still has jax.tree_map; FedJAX needs no fix')
  # `import prunax_fedjax` left JAX alone; stock FedJAX fails; server_optimizer fixes it.
  assert 'needed True True' in proc.stdout
  assert "stock fedjax fails: module 'jax' has no attribute 'tree_map'" in proc.stdout
  assert 'restored True' in proc.stdout

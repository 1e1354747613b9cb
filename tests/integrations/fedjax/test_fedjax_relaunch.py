"""A pruned FedAvg run interrupted and relaunched in a new process matches an uninterrupted run.

The first launch runs in the test process and saves the server state
(``prunax_fedjax.save_server_state``) after ``RELAUNCH_AT`` rounds, then runs on to
``NUM_ROUNDS`` without interruption. The relaunch is a fresh Python process (this file run
as a script) that rebuilds the data, model and algorithm, restores the state from the file
(``prunax_fedjax.restore_server_state``), runs the remaining rounds and saves. The test
compares the two final states.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

fedjax = pytest.importorskip(
  'fedjax', reason='fedjax is not installed (pip install -e integrations/fedjax)'
)
prunax_fedjax = pytest.importorskip('prunax_fedjax')

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import prunax  # noqa: E402
from prunax_fedjax.examples import federated_digits  # noqa: E402

NUM_ROUNDS = 8
RELAUNCH_AT = 4  # Mid-schedule: gradual pruning updates at steps 2, 4 and 6.
SCHEDULE = dict(update_freq=2, update_start_step=2, update_end_step=6)
ALGORITHMS = {
  'magnitude': SCHEDULE,
  'set': {**SCHEDULE, 'update_start_step': 0},
  'rigl': {**SCHEDULE, 'update_start_step': 0},
  'magnitude_ste': SCHEDULE,
  'autosparse': {'sparsity': 0.0},  # The sparsity is learned; 0.0 selects the kernels.
}


def _mlp(batch):
  x = hk.Flatten()(batch['x'])
  return hk.Linear(10)(jax.nn.relu(hk.Linear(32)(x)))


def _setup(algorithm: str):
  """Data, algorithm, pruner and initial state: all a launch rebuilds from scratch."""
  train, _ = federated_digits.federated_digits(num_clients=20, seed=0)
  sample = {'x': np.zeros((1, 8, 8, 1), np.float32), 'y': np.zeros((1,), np.int32)}
  model = fedjax.create_model_from_haiku(
    hk.transform(_mlp),
    sample,
    train_loss=lambda b, logits: fedjax.metrics.unreduced_cross_entropy_loss(b['y'], logits),
  )
  pruner = prunax.create_updater_from_config(
    {'algorithm': algorithm, 'sparsity': 0.8, 'dist_type': 'uniform', **ALGORITHMS[algorithm]}
  )
  algo = fedjax.algorithms.fed_avg.federated_averaging(
    fedjax.model_grad(model),
    fedjax.optimizers.sgd(0.05),
    prunax_fedjax.server_optimizer(pruner, optax.adam(1e-2)),
    fedjax.ShuffleRepeatBatchHParams(batch_size=8, num_epochs=1, seed=0),
  )
  init = prunax_fedjax.sparsify_initial_state(pruner, algo.init(model.init(jax.random.PRNGKey(0))))
  return train, algo, init


def _initial_state(algorithm: str):
  return _setup(algorithm)[2]


def _rounds(train, algo, state, start: int, end: int):
  for r in range(start, end):
    sampler = fedjax.client_samplers.UniformGetClientSampler(train, 4, seed=0, start_round_num=r)
    state, _ = algo.apply(state, sampler.sample())
  return state


def launch(algorithms: list[str], start: int, end: int, directory: str) -> None:
  """One launch: restore round ``start`` (if > 0), run to ``end``, save.

  The first launch (``start == 0``) also runs on, in the same process and without saving or
  restoring, to ``NUM_ROUNDS``: the uninterrupted run (one compilation for both).
  """
  for algorithm in algorithms:
    train, algo, state = _setup(algorithm)
    path = os.path.join(directory, f'{algorithm}.msgpack')
    if start:
      state = prunax_fedjax.restore_server_state(path, state)
    state = _rounds(train, algo, state, start, end)
    prunax_fedjax.save_server_state(path, state)
    if not start:
      whole = _rounds(train, algo, state, end, NUM_ROUNDS)
      prunax_fedjax.save_server_state(os.path.join(directory, f'{algorithm}.whole'), whole)


def _launch_process(algorithms, start, end, directory):
  result = subprocess.run(
    [sys.executable, __file__, ','.join(algorithms), str(start), str(end), directory],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_relaunched_rounds_match_uninterrupted_rounds(tmp_path):
  # Two algorithms (one compilation each per process): drop-and-grow with the pruner's RNG,
  # and STE's dense weights mid-schedule. test_prunax_fedjax.py restores every family
  # from a file within one process.
  algorithms = ['rigl', 'magnitude_ste']
  launch(algorithms, 0, RELAUNCH_AT, str(tmp_path))  # This process, then a new one.
  _launch_process(algorithms, RELAUNCH_AT, NUM_ROUNDS, str(tmp_path))
  for algorithm in algorithms:
    init = _initial_state(algorithm)
    resumed = prunax_fedjax.restore_server_state(tmp_path / f'{algorithm}.msgpack', init)
    whole = prunax_fedjax.restore_server_state(tmp_path / f'{algorithm}.whole', init)
    state, expected = (
      prunax.get_sparse_state(resumed.opt_state),
      prunax.get_sparse_state(whole.opt_state),
    )
    assert int(state.count) == int(expected.count) == NUM_ROUNDS, algorithm
    assert np.issubdtype(state.count.dtype, np.integer), algorithm
    assert np.issubdtype(state.rng.dtype, np.integer), algorithm
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(expected.masks), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=algorithm)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
      assert a.dtype == b.dtype, algorithm
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=algorithm)
    if algorithm != 'autosparse':  # The schedule's sparsity was reached after the relaunch.
      masks = prunax.bool_masks(resumed.opt_state, resumed.params)
      assert np.mean(~np.asarray(masks['linear']['w'])) == pytest.approx(0.8, abs=1e-3)


def test_restore_rejects_a_state_of_another_model(tmp_path):
  init = _initial_state('magnitude')
  path = tmp_path / 'state.msgpack'
  prunax_fedjax.save_server_state(path, init)
  other = jax.tree.map(lambda x: np.zeros((3,) + np.shape(x), np.asarray(x).dtype), init)
  with pytest.raises(
    ValueError,
    match=r"\['linear'\]\['b'\] was saved as float32\[10\] but "
    r'the template has float32\[3, 10\]',
  ):
    prunax_fedjax.restore_server_state(path, other)
  ste_init = _initial_state('magnitude_ste')  # Dense weights: more leaves.
  with pytest.raises(ValueError, match='leaves'):
    prunax_fedjax.restore_server_state(path, ste_init)


if __name__ == '__main__':
  launch(sys.argv[1].split(','), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

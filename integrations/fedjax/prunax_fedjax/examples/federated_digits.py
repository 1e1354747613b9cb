"""Server-side pruning with FedAvg on federated digits, the JaxPruner paper's setup scaled down.

scikit-learn's ``load_digits`` (1797 8x8 images, embedded: no download) is split non-IID over
50 clients (each holds two label-sorted shards, so mostly two digits); 20% of the images are
held out for evaluation. A small CNN with dropout is trained with FedJAX's own FedAvg: SGD on
the clients, Adam on the server, the server optimizer pruned by prunax. As in the paper
(section 4.2, 1000 rounds there): 80% sparsity with the ERK distribution, masks updated every
10 rounds up to 3/4 of the rounds: from the first round for drop-and-grow training (SET,
RigL), from 1/4 of the rounds for gradual pruning and magnitude/random STE (``GRADUAL``);
static sparse training and AutoSparse have no mask schedule (see :func:`make_pruner`).
Results are averaged over seeds.

Run ``python -m prunax_fedjax.examples.federated_digits --algorithms=no_prune,magnitude``.
"""

import argparse
import functools
import json
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import fedjax
import haiku as hk
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import prunax
import prunax_fedjax

GRADUAL = (
  'magnitude',
  'saliency',
  'random',
  'global_magnitude',
  'global_saliency',
  'magnitude_ste',
  'random_ste',
)


def federated_digits(
  num_clients: int = 50, seed: int = 0
) -> tuple[fedjax.InMemoryFederatedData, dict[str, np.ndarray]]:
  """Splits load_digits into non-IID clients (two label-sorted shards each) and a test set.

  Args:
    num_clients: number of clients.
    seed: seed of the train/test split and of the shard assignment.

  Returns:
    ``(train_data, test_set)``: a FedJAX federated dataset whose clients hold ``{'x': float32
    (n, 8, 8, 1) in [0, 1], 'y': int32 (n,)}``, and the held-out examples in the same format.
  """
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.RandomState(seed)
  order = rng.permutation(len(y))
  num_test = len(y) // 5
  test, train = order[:num_test], order[num_test:]
  train = train[np.argsort(y[train], kind='stable')]
  shards = np.array_split(train, 2 * num_clients)
  shard_order = rng.permutation(len(shards))
  clients = {}
  for c in range(num_clients):
    idx = np.concatenate([shards[shard_order[2 * c]], shards[shard_order[2 * c + 1]]])
    clients[f'client_{c:03d}'.encode()] = {'x': x[idx], 'y': y[idx]}
  return fedjax.InMemoryFederatedData(clients), {'x': x[test], 'y': y[test]}


def _forward(batch, is_train: bool = True):
  net = hk.Sequential(
    [
      hk.Conv2D(16, 3),
      jax.nn.relu,
      hk.Conv2D(32, 3, stride=2),
      jax.nn.relu,
      hk.Flatten(),
    ]
  )
  h = net(batch['x'])
  if is_train:
    h = hk.dropout(hk.next_rng_key(), 0.25, h)
  h = jax.nn.relu(hk.Linear(64)(h))
  return hk.Linear(10)(h)


def create_model() -> fedjax.Model:
  """The small CNN (conv16-conv32/2-dense64-dense10, dropout 0.25) as a FedJAX model."""
  sample = {'x': np.zeros((1, 8, 8, 1), np.float32), 'y': np.zeros((1,), np.int32)}
  return fedjax.create_model_from_haiku(
    hk.transform(_forward),
    sample,
    train_loss=lambda b, logits: fedjax.metrics.unreduced_cross_entropy_loss(b['y'], logits),
    eval_metrics={'accuracy': fedjax.metrics.Accuracy()},
    train_kwargs={'is_train': True},
    eval_kwargs={'is_train': False},
  )


def make_pruner(
  algorithm: str,
  num_rounds: int,
  sparsity: float = 0.8,
  seed: int = 0,
  update_freq: int = 10,
  overrides: Mapping[str, Any] | None = None,
):
  """The paper's pruner config, scaled to ``num_rounds`` (server steps, 0-based).

  The algorithms of ``GRADUAL`` (gradual pruning, magnitude/random STE) prune every
  ``update_freq`` rounds from ``num_rounds // 4`` to ``3 * num_rounds // 4``; the others
  get the same end and start at 0, and the schedule ``prunax.create_updater_from_config``
  implies for them applies: drop-and-grow training (SET, RigL) updates its masks from round
  0, static sparse training never changes the masks drawn at init, AutoSparse learns its
  sparsity (the target only selects the pruned leaves). ``overrides`` are merged into the
  config dict (e.g. ``{'extra': {'s_init': -3.0}}``).

  >>> s = make_pruner('magnitude', num_rounds=100).scheduler
  >>> type(s).__name__, s.update_freq, s.update_start_step, s.update_end_step
  ('PolynomialSchedule', 10, 25, 75)
  >>> s = make_pruner('rigl', num_rounds=100).scheduler
  >>> type(s).__name__, s.update_start_step, s.update_end_step
  ('PeriodicSchedule', 0, 75)
  >>> type(make_pruner('static_sparse', num_rounds=100).scheduler).__name__
  'NoUpdateSchedule'
  """
  start = num_rounds // 4 if algorithm in GRADUAL else 0
  return prunax.create_updater_from_config(
    {
      'algorithm': algorithm,
      'sparsity': sparsity,
      'dist_type': 'erk',
      'seed': seed,
      'update_freq': update_freq,
      'update_start_step': start,
      'update_end_step': 3 * num_rounds // 4,
      **(overrides or {}),
    }
  )


def run_one(
  algorithm: str = 'magnitude',
  *,
  seed: int = 0,
  num_rounds: int = 100,
  sparsity: float = 0.8,
  clients_per_round: int = 10,
  client_lr: float = 0.05,
  server_lr: float = 1e-2,
  batch_size: int = 8,
  client_epochs: int = 1,
  client_sparsity: bool = False,
  eval_every: int = 10,
  pruner_overrides: Mapping[str, Any] | None = None,
  pruner: prunax.BaseUpdater | None = None,
) -> dict[str, Any]:
  """One federated training run; returns per-round diagnostics and the final accuracy.

  Args:
    algorithm: a ``prunax.all_algorithm_names()`` entry ('no_prune' is the dense baseline).
    seed: seed of the data split, the model init, the client sampling and the pruner.
    num_rounds: federated rounds.
    sparsity: target sparsity.
    clients_per_round: clients sampled each round (out of 50).
    client_lr: client SGD learning rate.
    server_lr: server Adam learning rate.
    batch_size: client batch size.
    client_epochs: local epochs per round.
    client_sparsity: clients train only the weights the server keeps.
    eval_every: test accuracy is measured every this many rounds (and after the last).
    pruner_overrides: merged into the pruner config (see :func:`make_pruner`).
    pruner: an updater used as it is (its schedule counting rounds) instead of
      :func:`make_pruner`'s; ``algorithm``, ``sparsity`` and ``pruner_overrides`` are then
      not used (``prunax compare`` passes the updater of its config).

  Returns:
    ``{'algorithm', 'seed', 'final_accuracy', 'final_sparsity', 'seconds', 'rounds': [...]}``;
    each round's entry holds ``round`` (1-based), ``sparsity`` (of the params the server
    broadcasts next), ``upload_dense_bytes`` and ``upload_sparse_bytes`` (one client's
    update as dense arrays vs nonzero values + int32 indices), and ``accuracy`` on the
    evaluated rounds.
  """
  train_fd, test = federated_digits(seed=seed)
  model = create_model()
  if pruner is None:
    pruner = make_pruner(algorithm, num_rounds, sparsity, seed, overrides=pruner_overrides)
  server_opt = prunax_fedjax.server_optimizer(pruner, optax.adam(server_lr))
  if client_sparsity:
    client_opt = prunax_fedjax.client_optimizer(pruner, optax.sgd(client_lr))
  else:
    client_opt = fedjax.optimizers.sgd(client_lr)
  algo = fedjax.algorithms.fed_avg.federated_averaging(
    fedjax.model_grad(model),
    client_opt,
    server_opt,
    fedjax.ShuffleRepeatBatchHParams(batch_size=batch_size, num_epochs=client_epochs, seed=seed),
  )
  state = prunax_fedjax.sparsify_initial_state(
    pruner, algo.init(model.init(jax.random.PRNGKey(seed)))
  )
  sampler = fedjax.client_samplers.UniformGetClientSampler(train_fd, clients_per_round, seed)
  test_batches = fedjax.ClientDataset(test).padded_batch(fedjax.PaddedBatchHParams(batch_size=256))
  evaluate = functools.partial(fedjax.evaluate_model, model, batches=test_batches)
  rounds = []
  start = time.perf_counter()
  for r in range(1, num_rounds + 1):
    upload = prunax_fedjax.round_diagnostics(state.params, client_sparsity)
    state, _ = algo.apply(state, sampler.sample())
    entry = {
      'round': r,
      'upload_dense_bytes': upload['upload_dense_bytes'],
      'upload_sparse_bytes': upload['upload_sparse_bytes'],
      'sparsity': prunax_fedjax.round_diagnostics(state.params)['sparsity'],
    }
    if r % eval_every == 0 or r == num_rounds:
      entry['accuracy'] = float(evaluate(params=state.params)['accuracy'])
    rounds.append(entry)
  return {
    'algorithm': algorithm,
    'seed': seed,
    'final_accuracy': rounds[-1]['accuracy'],
    'final_sparsity': rounds[-1]['sparsity'],
    'seconds': time.perf_counter() - start,
    'rounds': rounds,
  }


def run(
  algorithms: Sequence[str] = ('no_prune', 'magnitude'), seeds: Sequence[int] = (0, 1, 2), **kwargs
) -> dict[str, dict[str, Any]]:
  """Runs every algorithm over every seed; returns per algorithm the mean and the runs.

  Args:
    algorithms: prunax algorithm names.
    seeds: seeds averaged over.
    **kwargs: passed to :func:`run_one`.

  Returns:
    ``{algorithm: {'mean_accuracy', 'std_accuracy', 'mean_sparsity', 'runs': [run_one(...)]}}``.
  """
  results = {}
  for algorithm in algorithms:
    runs = [run_one(algorithm, seed=s, **kwargs) for s in seeds]
    accs = np.array([r['final_accuracy'] for r in runs])
    results[algorithm] = {
      'mean_accuracy': float(accs.mean()),
      'std_accuracy': float(accs.std()),
      'mean_sparsity': float(np.mean([r['final_sparsity'] for r in runs])),
      'runs': runs,
    }
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--algorithms', default='no_prune,magnitude,magnitude_ste,rigl')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--num_rounds', type=int, default=100)
  parser.add_argument('--client_sparsity', action='store_true')
  parser.add_argument('--json', help='write the full results (per round) to this file')
  args = parser.parse_args(argv)
  results = run(
    args.algorithms.split(','),
    [int(s) for s in args.seeds.split(',')],
    num_rounds=args.num_rounds,
    client_sparsity=args.client_sparsity,
  )
  print(f'{"algorithm":18s} {"accuracy":>16s} {"sparsity":>9s}')
  for name, res in results.items():
    print(
      f'{name:18s} {res["mean_accuracy"]:8.4f} +- {res["std_accuracy"]:.4f} '
      f'{res["mean_sparsity"]:9.4f}'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()

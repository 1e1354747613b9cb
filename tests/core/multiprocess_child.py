"""One process of tests/core/test_multiprocess.py, and the single-process reference.

``python multiprocess_child.py PROCESS_ID PORT OUT_DIR`` joins a 2-process ``jax.distributed``
run on the loopback interface (4 CPU devices per process, gloo collectives), trains every
algorithm of :func:`run` on params sharded across both processes, writes the gathered masks
and params (process 0) and checks that an orbax checkpoint of params and optimizer state,
written by both processes, restores bit-identically. :func:`run` with no mesh is the
single-process reference.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

SHAPES = {'w1': (16, 200), 'w2': (40, 72), 'w3': (8, 256), 'b': (200,), 'stack': (3, 16, 64)}
# Last axes split 4 ways (50 weights per shard) or 2 ways (36 per shard); 'stack' is a
# stacked (scanned) kernel of 3 layers, each split over both axes.
SPECS = {
  'w1': ('data', 'model'),
  'w2': ('model', 'data'),
  'w3': (None, 'model'),
  'b': ('model',),
  'stack': (None, 'data', 'model'),
}
LAYER_AXES = {'stack': 0}
ALGORITHMS = ('magnitude', 'global_magnitude', 'rigl', 'ste')
CHECKPOINTED = ('rigl', 'ste')


def updaters():
  import prunax
  from prunax import sparsity_schedules as sched

  axes = LAYER_AXES
  return {
    'magnitude': prunax.MagnitudePruning(
      sparsity=0.7, scheduler=sched.PolynomialSchedule(1, 0, 3), layer_axes=axes
    ),
    'global_magnitude': prunax.GlobalMagnitudePruning(
      sparsity=0.6, scheduler=sched.PolynomialSchedule(1, 0, 3), layer_axes=axes
    ),
    'rigl': prunax.RigL(sparsity=0.7, scheduler=sched.PeriodicSchedule(1, 1), layer_axes=axes),
    'ste': prunax.SteMagnitudePruning(sparsity=0.7, layer_axes=axes),
  }


def host_params():
  rng = np.random.default_rng(0)
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  noise = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  return params, noise


def run(mesh=None, steps: int = 3):
  """Trains every algorithm; returns ``{algorithm: (params, opt_state)}`` (global arrays)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  params, noise = host_params()
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params)
  else:
    params = {
      n: jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, P(*SPECS[n])), lambda idx, x=x: x[idx]
      )
      for n, x in params.items()
    }

  def grads_of(p):
    # Elementwise in the weights: the same bits however the params are sharded.
    return jax.tree.map(lambda w, z: jnp.sin(3 * w) + 0.1 * z, p, noise)

  out = {}
  for name, updater in updaters().items():
    tx = updater.wrap_optax(optax.sgd(0.1))

    def step(p, s, tx=tx):
      u, s = tx.update(grads_of(p), s, p)
      return optax.apply_updates(p, u), s

    p, s = params, jax.jit(tx.init)(params)
    f = jax.jit(step)
    for _ in range(steps):
      p, s = f(p, s)
    out[name] = (p, s)
  return out


def masks_and_params(results):
  """``{'algorithm/mask/name': array, 'algorithm/param/name': array}`` of pruned leaves."""
  import jax
  from jax.experimental import multihost_utils

  import prunax

  def host(x):
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  arrays = {}
  for name, (p, s) in results.items():
    masks = jax.jit(prunax.bool_masks)(s, p)
    for n in SHAPES:
      if isinstance(masks[n], jax.Array):  # pruned leaves only (None/MaskedNode elsewhere)
        arrays[f'{name}/mask/{n}'] = host(masks[n])
      arrays[f'{name}/param/{n}'] = host(p[n])
  return arrays


def checkpoint_round_trip(results, directory: str):
  """Saves params and optimizer state with orbax from every process, restores them with
  the same shardings; returns leaves that differ (bits or sharding) in this process."""
  import jax
  import orbax.checkpoint as ocp

  differ = []
  checkpointer = ocp.StandardCheckpointer()
  for name in CHECKPOINTED:
    tree = {'params': results[name][0], 'opt_state': results[name][1]}
    path = os.path.join(directory, name)
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(path, target)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_restored = jax.tree.leaves(restored)
    if len(flat) != len(flat_restored):
      differ.append(f'{name}: {len(flat)} leaves saved, {len(flat_restored)} restored')
      continue
    for (path_, a), b in zip(flat, flat_restored):
      same = a.sharding == b.sharding and all(
        np.array_equal(x.data, y.data, equal_nan=True)
        for x, y in zip(a.addressable_shards, b.addressable_shards)
      )
      if not same or a.dtype != b.dtype:
        differ.append(f'{name}{jax.tree_util.keystr(path_)}')
  checkpointer.close()
  return differ


def main(process_id: int, port: int, out_dir: str):
  import jax

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  from jax.sharding import Mesh

  import prunax

  # Devices (process, i, j) -> mesh (data=j, model=2 * process + i): every 'model' split
  # spans both processes, so params are sharded across processes.
  devices = np.array(jax.devices()).reshape(2, 2, 2).transpose(2, 0, 1).reshape(2, 4)
  mesh = Mesh(devices, ('data', 'model'))
  results = run(mesh)
  arrays = masks_and_params(results)
  if process_id == 0:
    np.savez(os.path.join(out_dir, 'multiprocess.npz'), **arrays)
  st = prunax.get_sparse_state(results['rigl'][1])
  report = {
    'process_count': jax.process_count(),
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'w1_processes': sorted({d.process_index for d in results['rigl'][0]['w1'].devices()}),
    'mask_w1_spec': list(st.masks['w1'].sharding.spec),
    'stack_mask_specs': {
      name: list(prunax.get_sparse_state(s).masks['stack'].sharding.spec)
      for name, (_, s) in results.items()
    },
    'checkpoint_differs': checkpoint_round_trip(results, os.path.join(out_dir, 'ckpt')),
  }
  print('REPORT' + json.dumps(report), flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

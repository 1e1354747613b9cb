"""Two processes x 4 CPU devices with ``jax.distributed``: the same masks as one process.

Params, among them a stacked (scanned) kernel whose layers are pruned one by one, are
sharded across both processes (see ``multiprocess_child.py``, which each process runs,
coordinated on 127.0.0.1 with gloo CPU collectives). Magnitude, global magnitude,
RigL and STE masks and params after 3 jitted steps must be bit-identical to this process's
single-device run (the gradients are elementwise in the weights, so no reduction order
differs), and an orbax checkpoint written by both processes must restore bit-identically.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.core import multiprocess_child as child
from tests.xla_env import cpu_env

TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp('multiprocess'))
  env = cpu_env(4)
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, child.__file__, str(i), str(port), out_dir],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  # The single-process reference runs here meanwhile (1 CPU device, unsharded params).
  reference = child.masks_and_params(child.run())
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (_, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-4000:]
  reports = [
    json.loads(next(x for x in stdout.splitlines() if x.startswith('REPORT'))[6:])
    for stdout, _ in outputs
  ]
  with np.load(os.path.join(out_dir, 'multiprocess.npz')) as f:
    multi = dict(f)
  return reference, multi, reports


def test_two_processes_of_four_devices_share_the_params(runs):
  _, _, reports = runs
  for r in reports:
    assert r['process_count'] == 2 and r['device_count'] == 8 and r['local_device_count'] == 4
    assert r['w1_processes'] == [0, 1], r  # one param's shards live in both processes
    assert r['mask_w1_spec'] == ['data', 'model'], r
    # A stacked leaf's masks split like it over both axes (STE's were split over one).
    for spec in r['stack_mask_specs'].values():
      assert spec == [None, 'data', 'model'], r


@pytest.mark.parametrize('name', child.ALGORITHMS)
def test_masks_and_params_match_one_process(runs, name):
  reference, multi, _ = runs
  keys = sorted(k for k in reference if k.startswith(name + '/'))
  assert [k for k in keys if '/mask/' in k] == [
    f'{name}/mask/{n}' for n in ('stack', 'w1', 'w2', 'w3')
  ]
  assert keys == sorted(k for k in multi if k.startswith(name + '/'))
  for k in keys:
    np.testing.assert_array_equal(multi[k], reference[k], err_msg=k)
  kept = np.mean([reference[k].mean() for k in keys if '/mask/' in k])
  assert 0.2 < kept < 0.5, kept  # pruned, at about the target


def test_checkpoint_written_by_both_processes_restores_bit_identically(runs):
  _, _, reports = runs
  for r in reports:
    assert r['checkpoint_differs'] == [], r

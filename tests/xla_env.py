"""The XLA settings of the test suite and of the processes it launches.

The suite compiles hundreds of small programs, and most of each compile is LLVM
optimising the generated CPU code, which no test reads: XLA's HLO passes (fusion, layout,
buffer assignment, SPMD partitioning and its collectives) run the same at every backend
optimisation level, and so do the temporaries and instructions the tests count
(``tests/test_xla_env.py`` checks that the optimised HLO of a mask-update step is the
same text at both levels). So the suite runs with ``--xla_backend_optimization_level=0``
(``tests/conftest.py``), and the processes it launches inherit it. Measured on a
2-core AMD EPYC, jax 0.10.2: ``tests/core/test_updater.py`` and
``tests/core/test_optimizer_states.py`` (151 tests) took 92 s at the default level (3)
and 70 s at 0; the whole suite (2 workers) took 490 s, where runs at the default level
took 573-704 s on the same machine. A run that sets the level itself in ``XLA_FLAGS``
keeps its own (``XLA_FLAGS=--xla_backend_optimization_level=3 make test`` tests the
fully optimised code). Benchmarks never use this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LEVEL_FLAG = '--xla_backend_optimization_level'


def suite_flags(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with the suite's backend optimisation level,
  unless they give one."""
  if LEVEL_FLAG in flags:
    return flags
  return f'{flags} {LEVEL_FLAG}=0'.strip()


def cpu_env(devices: int) -> dict[str, str]:
  """The environment of a child process with ``devices`` CPU devices (XLA's device count
  is fixed when JAX starts), keeping this process's other XLA flags."""
  flags = os.environ.get('XLA_FLAGS', '')
  flags = ' '.join(f for f in flags.split() if 'xla_force_host_platform_device_count' not in f)
  flags = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  return dict(os.environ, XLA_FLAGS=suite_flags(flags), JAX_PLATFORMS='cpu')


def child_report(script: str, env: dict[str, str], timeout: int = 900) -> dict:
  """Runs ``script`` in a child Python with ``env`` and returns the JSON it prints after
  ``REPORT`` (the child's stderr in the failure if it exits with an error)."""
  out = subprocess.run(
    [sys.executable, '-c', script],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  line = next(x for x in out.stdout.splitlines() if x.startswith('REPORT'))
  return json.loads(line[len('REPORT') :])

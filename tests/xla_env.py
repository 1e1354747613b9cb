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

The suite also compiles with XLA's older CPU fusion emitters
(``--xla_cpu_use_fusion_emitters=false``): at level 0 they emit each kernel's code in
about half the time. Measured on a 2-core Intel Xeon, jax 0.10.2, the same 151 tests:
75-86 s with the new emitters, 43-56 s with the old ones; the backend compiles in them
took 105 s and 46 s. Unlike the level, the emitters change the optimised HLO a little
(which reductions fuse with the elementwise code around them), so every test that reads
optimised HLO (kernels, temporaries, instructions, collectives) compiles it as a user's
process does, with :func:`compile_as_users` (``tests/test_xla_env.py`` checks that this
gives the HLO of a process started without the flag). The code that runs is compiled
by either set of emitters from the same fused HLO; the tests check its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LEVEL_FLAG = '--xla_backend_optimization_level'
EMITTERS_FLAG = '--xla_cpu_use_fusion_emitters'
# The compile options under which a test's optimised HLO is what a user's process gets.
AS_USERS = {EMITTERS_FLAG[2:]: True}


def suite_flags(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with the suite's backend optimisation level and
  fusion emitters, each unless they give it."""
  for flag, value in ((LEVEL_FLAG, '0'), (EMITTERS_FLAG, 'false')):
    if flag not in flags:
      flags = f'{flags} {flag}={value}'.strip()
  return flags


def users_flags(flags: str) -> str:
  """``flags`` without the suite's fusion emitters: those of a user's process."""
  return ' '.join(f for f in flags.split() if not f.startswith(EMITTERS_FLAG))


def compile_as_users(lowered):
  """``lowered.compile()`` with the fusion emitters of a process started without the
  suite's flags: for tests that read the optimised HLO."""
  return lowered.compile(compiler_options=AS_USERS)


def cpu_env(devices: int, users_emitters: bool = False) -> dict[str, str]:
  """The environment of a child process with ``devices`` CPU devices (XLA's device count
  is fixed when JAX starts), keeping this process's other XLA flags; with
  ``users_emitters``, without the suite's fusion emitters (for a child that checks what
  users' code generation does)."""
  flags = os.environ.get('XLA_FLAGS', '')
  flags = ' '.join(f for f in flags.split() if 'xla_force_host_platform_device_count' not in f)
  flags = suite_flags(f'{flags} --xla_force_host_platform_device_count={devices}'.strip())
  if users_emitters:
    flags = users_flags(flags)
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')


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

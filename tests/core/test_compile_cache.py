"""A relaunch compiles nothing: pruned steps lower to the same program in every process.

Hosts compile their train step at every launch (t5x does), and a run resumed after a
preemption compiles it again; JAX's persistent compilation cache
(``jax_compilation_cache_dir``) serves a relaunch only if the program, its key, is the
same in the new process. Two processes with different Python hash seeds (set and dict
orders, ``hash`` of strings) compile the steps of ``compile_cache_child.py`` (every
engine, global selection, drop and grow, N:M, a stacked kernel pruned layer by layer)
into one cache folder: the second must find every program there and write none.
"""

import os

from tests.core import compile_cache_child as child
from tests.xla_env import child_report
from tests.xla_env import cpu_env

TIMEOUT_S = 300


def _compile_all(cache_dir: str, hash_seed: str) -> list[str]:
  script = f'from tests.core import compile_cache_child as c; c.main({cache_dir!r})'
  return child_report(script, dict(cpu_env(1), PYTHONHASHSEED=hash_seed), TIMEOUT_S)


def _entries(cache_dir: str) -> set[str]:
  return set(os.listdir(cache_dir))


def test_a_relaunch_finds_every_pruned_step_in_the_persistent_cache(tmp_path):
  cache_dir = str(tmp_path / 'jax_cache')
  assert _compile_all(cache_dir, '1') == list(child.ALGORITHMS)
  first = _entries(cache_dir)
  # Every step's program was written (JAX names an entry after its module), with the
  # programs of the states' init.
  steps = [e for e in first if e.startswith('jit_step')]
  assert len(steps) == len(child.ALGORITHMS), sorted(first)
  assert _compile_all(cache_dir, '2') == list(child.ALGORITHMS)
  new = _entries(cache_dir) - first
  assert not new, (
    f'the relaunch compiled {len(new)} programs the first process had cached: {sorted(new)}'
  )

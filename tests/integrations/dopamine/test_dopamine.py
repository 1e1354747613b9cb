"""prunax_dopamine with the real dopamine-rl 4.1.2, run through Dopamine's own runners.

Every experiment loads the shipped CartPole config with ``run_experiment.load_gin_configs``,
shrunk by gin bindings (64 hidden units, 300-step iterations), and runs Dopamine's
``Runner``/``TrainRunner`` (``create_pruned_runner``). Pruning steps count optimizer
updates: about 100 in iteration 0 and 150 in iteration 1.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec('dopamine') is None:
  pytest.skip(
    'dopamine-rl is not installed (pip install integrations/dopamine)', allow_module_level=True
  )
prunax_dopamine = importlib.import_module('prunax_dopamine')
# Before Dopamine is imported: the fixes it needs to import on these versions (compat.py).
prunax_dopamine.compat.apply()

import gin  # noqa: E402
import gymnasium  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from dopamine.discrete_domains import checkpointer  # noqa: E402
from dopamine.discrete_domains import gym_lib  # noqa: E402
from dopamine.discrete_domains import run_experiment  # noqa: E402
from dopamine.jax.agents.dqn import dqn_agent  # noqa: E402
from dopamine.jax.agents.implicit_quantile import implicit_quantile_agent  # noqa: E402
from dopamine.jax.agents.quantile import quantile_agent  # noqa: E402
from dopamine.jax.agents.rainbow import rainbow_agent  # noqa: E402

import prunax  # noqa: E402
from prunax_dopamine import compat  # noqa: E402
from prunax_dopamine import run as run_lib  # noqa: E402

SMALL_CARTPOLE = [
  'ClassicControlDQNNetwork.hidden_units = 64',
  'JaxDQNAgent.min_replay_history = 100',
  'JaxDQNAgent.update_period = 2',
  'JaxDQNAgent.target_update_period = 50',
  'ReplayBuffer.batch_size = 32',
  'Runner.training_steps = 300',
  'Runner.num_iterations = 2',
  "CollectorDispatcher.collectors = ('console', 'pickle')",
]
GRADUAL = {
  'sparsity': 0.8,
  'dist_type': "'erk'",
  'update_start_step': 0,
  'update_end_step': 150,
  'update_freq': 10,
}
DYNAMIC = {'sparsity': 0.8, 'dist_type': "'erk'", 'update_freq': 20, 'drop_fraction': 0.3}
FAMILIES = {
  'magnitude': GRADUAL,
  'random': GRADUAL,
  'global_magnitude': {**GRADUAL, 'dist_type': "'uniform'"},
  'magnitude_ste': GRADUAL,
  'static_sparse': {'sparsity': 0.8, 'dist_type': "'erk'"},
  'set': DYNAMIC,
  'rigl': DYNAMIC,
  'autosparse': {'sparsity': 0.8},
}
GROWS_AT_ZERO = ('set', 'rigl')  # Grown weights start at 0 and may stay 0 (dead ReLU units).


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def pruner_bindings(algorithm: str, **config) -> list[str]:
  return [f"prunax_dopamine.pruner.algorithm = '{algorithm}'"] + [
    f'prunax_dopamine.pruner.{key} = {value}' for key, value in config.items()
  ]


def make_runner(
  base_dir: str, bindings: list[str], config: str = 'dqn_cartpole.gin'
) -> run_experiment.Runner:
  """Dopamine's own flow: load_gin_configs, then the runner (resuming from base_dir)."""
  run_experiment.load_gin_configs([prunax_dopamine.config_path(config)], bindings)
  return prunax_dopamine.create_pruned_runner(base_dir)


def collected(base_dir: str) -> dict:
  """What Dopamine's pickle collector recorded, by iteration."""
  files = glob.glob(os.path.join(base_dir, 'metrics', 'pickle', 'pickle_*.pkl'))
  latest = max(files, key=lambda f: int(f.rsplit('_', 1)[1].split('.')[0]))
  with open(latest, 'rb') as f:
    return pickle.load(f)


def pruned_leaves(masks, params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """(boolean mask, param) of every pruned leaf, by name."""
  flat_masks = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  return {
    jax.tree_util.keystr(path): (np.asarray(m).astype(bool), np.asarray(p))
    for (path, m), p in zip(flat_masks, jax.tree.leaves(params))
    if m is not None
  }


def zeros_per_leaf(tree) -> dict[str, int]:
  return {
    jax.tree_util.keystr(path): int(np.sum(np.asarray(x) == 0))
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if np.ndim(x) >= 2
  }


def scheduled_zeros(pruner, sparsity: float, size: int, count: int) -> int:
  """round(s * size) at the schedule's sparsity s after ``count`` updates."""
  s = np.float32(pruner.scheduler.sparsity(jnp.int32(count - 1), jnp.float32(sparsity)))
  return int(np.round(s * np.float32(size)))


def check_scheduled(pruner, algorithm: str, params, opt_state) -> None:
  """Masks exactly at the schedule's sparsity after the state's count; params zero outside."""
  state = prunax.get_sparse_state(opt_state)
  count = int(state.count)
  leaves = pruned_leaves(prunax.unpack_masks(state.masks, params), params)
  targets = {
    jax.tree_util.keystr(path): t
    for path, t in jax.tree_util.tree_flatten_with_path(
      pruner.target_sparsities(params), is_leaf=lambda x: x is None
    )[0]
    if t is not None
  }
  assert set(leaves) == set(targets) and leaves
  for name, (mask, param) in leaves.items():
    assert not np.any(param[~mask]), f'{name}: a pruned weight is nonzero'
  if algorithm == 'autosparse':  # The sparsity is learned (thresholds), not scheduled.
    assert jax.tree.leaves(state.algorithm_state.thresholds) and jax.tree.leaves(
      state.algorithm_state.dense_params
    )
    for name, (mask, param) in leaves.items():
      assert int(np.sum(param == 0)) == int(np.sum(~mask)), name
    return
  if algorithm.startswith('global'):
    size = sum(mask.size for mask, _ in leaves.values())
    mask_zeros = sum(int(np.sum(~mask)) for mask, _ in leaves.values())
    param_zeros = sum(int(np.sum(param == 0)) for _, param in leaves.values())
    assert mask_zeros == param_zeros == scheduled_zeros(pruner, pruner.sparsity, size, count)
    return
  for name, (mask, param) in leaves.items():
    expected = scheduled_zeros(pruner, targets[name], mask.size, count)
    assert int(np.sum(~mask)) == expected, name
    if algorithm in GROWS_AT_ZERO:  # Only grown weights may add zeros.
      assert int(np.sum(param == 0)) >= expected, name
    else:
      assert int(np.sum(param == 0)) == expected, name


@pytest.mark.parametrize('algorithm', list(FAMILIES))
def test_native_runner_prunes_every_family(algorithm, tmp_path):
  if algorithm not in prunax.all_algorithm_names():
    pytest.skip(f'prunax has no {algorithm!r} algorithm yet')
  base_dir = str(tmp_path)
  compiled_before = dqn_agent.train._cache_size()
  runner = make_runner(base_dir, SMALL_CARTPOLE + pruner_bindings(algorithm, **FAMILIES[algorithm]))
  runner.run_experiment()
  agent = runner._agent
  assert isinstance(agent, prunax_dopamine.PrunedDQNAgent)

  # One compilation of Dopamine's jitted train for the whole run: the optimizer (a static
  # argument) is built once and hashable.
  assert dqn_agent.train._cache_size() - compiled_before == 1
  hash(agent.optimizer)

  state = prunax.get_sparse_state(agent.optimizer_state)
  assert int(state.count) >= 200  # The last target sync came after update 150.
  check_scheduled(agent.pruner, algorithm, agent.online_params, agent.optimizer_state)
  # The target network was synced after the schedule ended: the same sparsity.
  target_zeros = zeros_per_leaf(agent.target_network_params)
  if algorithm in GROWS_AT_ZERO:  # Same mask sparsity, grown weights may still be 0.
    masks = prunax.unpack_masks(state.masks, agent.online_params)
    for name, (mask, _) in pruned_leaves(masks, agent.online_params).items():
      assert target_zeros[name] >= int(np.sum(~mask)), name
  elif algorithm != 'autosparse':
    assert target_zeros == zeros_per_leaf(agent.online_params)

  # Iteration 0 as checkpointed by Dopamine: mid-schedule for gradual pruning.
  bundle = checkpointer.Checkpointer(os.path.join(base_dir, 'checkpoints')).load_checkpoint(0)
  first = prunax.get_sparse_state(bundle['optimizer_state'])
  assert 50 <= int(first.count) < 150
  check_scheduled(agent.pruner, algorithm, bundle['online_params'], bundle['optimizer_state'])

  # Sparsity and returns reported through Dopamine's collectors, per iteration.
  stats = collected(base_dir)
  assert math.isfinite(stats['iteration_1']['Train/AverageReturns'][0])
  assert stats['iteration_1']['Train/AverageReturns'][0] > 0
  for iteration, params in ((0, bundle['online_params']), (1, agent.online_params)):
    summary = prunax.summarize_sparsity(params)
    reported = stats[f'iteration_{iteration}']
    assert reported['Sparsity/Total'] == [summary['total_sparsity']]
    assert reported['Sparsity/params/layers_0/kernel'] == [
      summary['sparsity/params/layers_0/kernel']
    ]

  if algorithm == 'magnitude_ste':  # Dense weights live in the optimizer state.
    dense = sum(
      int(np.count_nonzero(x)) for x in jax.tree.leaves(state.algorithm_state.dense_params)
    )
    sparse = sum(
      int(np.count_nonzero(p))
      for _, p in pruned_leaves(
        prunax.unpack_masks(state.masks, agent.online_params), agent.online_params
      ).values()
    )
    assert dense > 4 * sparse
  if algorithm in ('set', 'rigl'):  # The masks moved between iterations.
    assert not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(first.masks), jax.tree.leaves(state.masks))
    )


def test_resume_restores_masks_and_optimizer_state(tmp_path):
  # STE: the masks change at every step and the dense weights live in the optimizer state.
  algorithm = 'magnitude_ste'
  base_dir = str(tmp_path)
  bindings = SMALL_CARTPOLE + pruner_bindings(algorithm, **FAMILIES[algorithm])
  first = make_runner(base_dir, bindings + ['Runner.num_iterations = 1'])
  first.run_experiment()
  saved = first._agent

  gin.clear_config()
  resumed = make_runner(base_dir, bindings)  # Dopamine reloads checkpoint 0 here.
  agent = resumed._agent
  assert agent is not saved
  restored_state = prunax.get_sparse_state(agent.optimizer_state)
  saved_state = prunax.get_sparse_state(saved.optimizer_state)
  assert int(restored_state.count) > 0
  for name in ('optimizer_state', 'online_params', 'target_network_params'):
    restored, original = getattr(agent, name), getattr(saved, name)
    assert jax.tree.structure(restored) == jax.tree.structure(original), name
    assert all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original))
    ), name
  assert agent.training_steps == saved.training_steps

  resumed.run_experiment()  # Iteration 1 only, continuing the schedule.
  state = prunax.get_sparse_state(agent.optimizer_state)
  assert int(state.count) > int(saved_state.count) + 100
  check_scheduled(agent.pruner, algorithm, agent.online_params, agent.optimizer_state)
  assert sorted(collected(base_dir)) == ['iteration_1']


class _SameStart(gymnasium.Wrapper):
  """Every episode starts from the same state: CartPole is then deterministic given actions."""

  def reset(self, **kwargs):
    del kwargs
    return self.env.reset(seed=0)


@gin.configurable
def same_start_cartpole():
  """Dopamine's CartPole with a reset that does not depend on the process's history.

  Dopamine does not checkpoint the environment (its iterations end at episode ends);
  gymnasium draws each start state from an RNG seeded anew in every process, which would
  make a relaunched run differ from an uninterrupted one for reasons outside the agent.
  """
  env = gym_lib.create_gym_environment('CartPole', 'v1')
  env.environment = _SameStart(env.environment)
  return env


RESUME_FAMILIES = {
  'magnitude': {**GRADUAL, 'update_end_step': 80},  # Mid-schedule at the relaunch.
  'rigl': {**DYNAMIC, 'update_freq': 10},
  'set': {**DYNAMIC, 'update_freq': 10},
  'magnitude_ste': {**GRADUAL, 'update_end_step': 80},
  'autosparse': FAMILIES['autosparse'],
}
RESUME_BINDINGS = SMALL_CARTPOLE + [
  'TrainRunner.create_environment_fn = @same_start_cartpole',
  'Runner.training_steps = 150',
  # Many exploratory actions: a resumed run that re-seeded the agent's RNG would diverge.
  'JaxDQNAgent.epsilon_train = 0.3',
]


def _final_agent(base_dir: str, bindings: list[str], iterations: int):
  gin.clear_config()
  runner = make_runner(base_dir, bindings + [f'Runner.num_iterations = {iterations}'])
  runner.run_experiment()
  return runner._agent


@pytest.mark.parametrize('algorithm', list(RESUME_FAMILIES))
def test_relaunch_into_base_dir_matches_uninterrupted_run(algorithm, tmp_path):
  """N iterations, a new runner into the same base_dir to 2N, vs 2N in one launch."""
  bindings = RESUME_BINDINGS + pruner_bindings(algorithm, **RESUME_FAMILIES[algorithm])
  whole = _final_agent(str(tmp_path / 'whole'), bindings, 2)
  interrupted = str(tmp_path / 'interrupted')
  first = _final_agent(interrupted, bindings, 1)
  first_count = int(prunax.get_sparse_state(first.optimizer_state).count)
  resumed = _final_agent(interrupted, bindings, 2)  # Dopamine reloads checkpoint 0.
  assert resumed is not first
  assert sorted(collected(interrupted)) == ['iteration_1']  # Only iteration 1 ran.

  state = prunax.get_sparse_state(resumed.optimizer_state)
  expected = prunax.get_sparse_state(whole.optimizer_state)
  assert 0 < first_count < int(state.count) == int(expected.count)
  assert resumed.training_steps == whole.training_steps
  # Integer state stays integer through Dopamine's checkpoint.
  for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert restored.dtype == original.dtype
  for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(expected.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ('online_params', 'target_network_params', 'optimizer_state'):
    got, want = getattr(resumed, name), getattr(whole, name)
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if jnp.issubdtype(a.dtype, jnp.floating):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  check_scheduled(resumed.pruner, algorithm, resumed.online_params, resumed.optimizer_state)


VARIANTS = {
  'PrunedRainbowAgent': (
    'JaxRainbowAgent',
    rainbow_agent.train,
    [
      'JaxRainbowAgent.network = @networks.ClassicControlRainbowNetwork',
      'ClassicControlRainbowNetwork.hidden_units = 64',
    ],
  ),
  'PrunedQuantileAgent': (
    'JaxQuantileAgent',
    quantile_agent.train,
    ['JaxQuantileAgent.num_atoms = 16'],
  ),
  'PrunedImplicitQuantileAgent': (
    'JaxImplicitQuantileAgent',
    implicit_quantile_agent.train,
    [
      'JaxImplicitQuantileAgent.num_tau_samples = 8',
      'JaxImplicitQuantileAgent.num_tau_prime_samples = 8',
      'JaxImplicitQuantileAgent.num_quantile_samples = 8',
    ],
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize('agent_name', list(VARIANTS))
def test_variants_train_with_pruning(agent_name, tmp_path):
  base, train_fn, extra = VARIANTS[agent_name]
  bindings = (
    SMALL_CARTPOLE
    + extra
    + [
      f'create_pruned_runner.agent = @prunax_dopamine.{agent_name}',
      f'{agent_name}.pruner = @prunax_dopamine.pruner()',
      'Runner.num_iterations = 1',
      'Runner.training_steps = 200',
    ]
    + pruner_bindings(
      'magnitude',
      sparsity=0.8,
      dist_type="'erk'",
      update_start_step=0,
      update_end_step=40,
      update_freq=10,
    )
  )
  if base != 'JaxDQNAgent':  # These agents pass their own defaults to JaxDQNAgent.
    bindings += [
      f'{base}.observation_shape = %gym_lib.CARTPOLE_OBSERVATION_SHAPE',
      f'{base}.observation_dtype = %jax_networks.CARTPOLE_OBSERVATION_DTYPE',
      f'{base}.stack_size = %gym_lib.CARTPOLE_STACK_SIZE',
      f'{base}.min_replay_history = 100',
      f'{base}.update_period = 2',
      f'{base}.target_update_period = 50',
      f'{base}.epsilon_fn = @jax.agents.dqn.dqn_agent.identity_epsilon',
      f'{base}.seed = 0',
    ]
  compiled_before = train_fn._cache_size()
  runner = make_runner(str(tmp_path), bindings)
  runner.run_experiment()
  agent = runner._agent
  assert type(agent).__name__ == agent_name
  assert train_fn._cache_size() - compiled_before == 1
  assert int(prunax.get_sparse_state(agent.optimizer_state).count) > 40
  check_scheduled(agent.pruner, 'magnitude', agent.online_params, agent.optimizer_state)
  assert prunax.summarize_sparsity(agent.online_params)['total_sparsity'] > 0.75


def test_readme_command_prints_returns_and_sparsity(tmp_path):
  # What `python -m prunax_dopamine.run --base_dir=...` runs and prints, made smaller.
  lines = run_lib.run(
    str(tmp_path),
    ['dqn_cartpole.gin'],
    SMALL_CARTPOLE
    + [
      'Runner.num_iterations = 1',
      'Runner.training_steps = 200',
      'prunax_dopamine.pruner.update_end_step = 20',
    ],
  )
  assert lines[0].startswith('[Iteration 0]: Train/AverageReturns = ')
  assert math.isfinite(float(lines[0].rsplit('= ', 1)[1]))
  sparsity = {
    line.split(': ')[1].split(' = ')[0]: float(line.rsplit('= ', 1)[1]) for line in lines[1:]
  }
  assert sparsity['Sparsity/Total'] == pytest.approx(0.9, abs=1e-4)  # ERK, rounded per layer.
  assert sparsity['Sparsity/TargetTotal'] <= sparsity['Sparsity/Total']


def test_pruner_factory_rejects_bad_values():
  with pytest.raises(ValueError, match='magnitude'):
    prunax_dopamine.pruner(algorithm='magnitud', sparsity=0.5)
  with pytest.raises(ValueError, match='needs a prunax updater'):
    prunax_dopamine.PrunedDQNAgent(num_actions=2, pruner='magnitude')


def _ale_rom(name: str) -> bool:
  try:
    from ale_py import roms

    return os.path.isfile(roms.get_rom_path(name))
  except (ImportError, AttributeError, FileNotFoundError):
    return False


@pytest.mark.slow
@pytest.mark.skipif(not _ale_rom('ms_pacman'), reason='ale-py does not ship the MsPacman ROM')
def test_mspacman_paper_config_runs_a_few_hundred_steps(tmp_path):
  bindings = [
    'Runner.num_iterations = 1',
    'Runner.training_steps = 300',
    'Runner.max_steps_per_episode = 300',
    'JaxDQNAgent.min_replay_history = 200',
    'JaxDQNAgent.target_update_period = 100',
    'ReplayBuffer.max_capacity = 1000',
    "CollectorDispatcher.collectors = ('pickle',)",
    'prunax_dopamine.pruner.update_start_step = 0',
    'prunax_dopamine.pruner.update_end_step = 10',
    'prunax_dopamine.pruner.update_freq = 5',
  ]
  runner = make_runner(str(tmp_path), bindings, config='dqn_mspacman_erk98.gin')
  runner.run_experiment()
  agent = runner._agent
  assert agent.network_def.__class__.__name__ == 'NatureDQNNetwork'
  assert int(prunax.get_sparse_state(agent.optimizer_state).count) > 10
  check_scheduled(agent.pruner, 'magnitude', agent.online_params, agent.optimizer_state)
  summary = prunax.summarize_sparsity(agent.online_params)
  assert summary['total_sparsity'] == pytest.approx(0.98, abs=1e-4)
  assert math.isfinite(collected(str(tmp_path))['iteration_0']['Train/AverageReturns'][0])


def test_compat_fixes_what_this_environment_needs():
  fixes = compat.applied()
  from jax.interpreters import xla

  assert xla.pytype_aval_mappings is jax._src.core.pytype_aval_mappings
  if 'baselines' in fixes:
    from baselines.common import atari_wrappers

    with pytest.raises(AttributeError, match='use_ppo_preprocessing'):
      _ = atari_wrappers.NoopResetEnv
  # The legacy gym path (breakage 5) steps under numpy 2.
  from dopamine.discrete_domains import gym_lib

  env = gym_lib.create_gym_environment('CartPole', 'v1', use_legacy_gym=True)
  env.reset()
  _, reward, terminal, _ = env.step(0)
  assert reward == 1.0 and terminal in (True, False)
  assert compat.apply() == fixes  # Idempotent.


_UNFIXED_IMPORT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location('compat', sys.argv[1])
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
if sys.argv[2] == 'tfp_xla_alias':
  compat._fix_baselines()  # Past the first breakage, to reach the second.
import dopamine.discrete_domains.run_experiment
"""


def test_dopamine_fails_without_the_fixes():
  """Each applied import fix is needed: without it, Dopamine's launcher does not import."""
  errors = {
    'baselines': "No module named 'baselines'",
    'tfp_xla_alias': "has no attribute 'pytype_aval_mappings'",
  }
  needed = [fix for fix in compat.applied() if fix in errors]
  if not needed:
    pytest.skip('this environment needs neither the baselines nor the tfp fix')
  for fix in needed:
    result = subprocess.run(
      [sys.executable, '-c', _UNFIXED_IMPORT, compat.__file__, fix],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    assert result.returncode != 0 and errors[fix] in result.stderr, result.stderr[-2000:]


_FRESH_PROCESS = """
import sys
import numpy as np
import prunax_dopamine
from prunax_dopamine import compat
needed = compat.needed()
print('import patched:', compat.applied(), 'dopamine' in sys.modules, 'baselines' in sys.modules,
      hasattr(np, 'bool8'))
if sys.argv[1] == 'agents':
  try:
    import prunax_dopamine.agents
    print('agents imported')
  except ImportError as e:
    print('agents refused:', e)
elif sys.argv[1] == 'names':
  agent = prunax_dopamine.PrunedDQNAgent
  print('applied', compat.applied() == needed, compat.needed(), agent.__name__)
elif sys.argv[1] == 'launcher':
  import tempfile
  from prunax_dopamine import run
  print('launcher imported', compat.applied(), 'dopamine' in sys.modules)
  with tempfile.TemporaryDirectory() as base_dir:
    run.run(base_dir, ['dqn_cartpole.gin'], ['Runner.training_steps = 20',
                                              'Runner.num_iterations = 1'])
  print('launcher ran', compat.applied() == needed)
print('needed', needed)
"""


def _fresh(mode: str) -> str:
  result = subprocess.run(
    [sys.executable, '-c', _FRESH_PROCESS, mode],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_importing_the_package_patches_nothing_and_imports_no_dopamine():
  out = _fresh('agents')
  assert 'import patched: () False False' in out
  if 'needed ()' in out:
    assert 'agents imported' in out
  else:  # Importing the agents before compat.apply() names the missing call.
    assert 'agents refused:' in out and 'call prunax_dopamine.compat.apply()' in out


def test_the_agent_names_apply_the_needed_fixes_first():
  out = _fresh('names')
  assert 'applied True () PrunedDQNAgent' in out


def test_the_launcher_applies_the_fixes_when_it_runs():
  out = _fresh('launcher')
  assert 'launcher imported () False' in out  # Importing run.py patches nothing...
  assert 'launcher ran True' in out  # ...run() applies what this environment needs.


def test_needed_lists_exactly_what_apply_fixes():
  out = _fresh('none')
  needed = out.split('needed ')[-1].strip()
  assert needed == repr(compat.applied()), (needed, compat.applied())

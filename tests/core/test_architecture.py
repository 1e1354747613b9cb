"""The layout rules: algorithms composed from parts, their own state, no private calls
across modules."""

import ast
import dataclasses
import inspect
import pathlib
from typing import Any
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import engines
from prunax import registry
from prunax import strategies
from prunax.algorithms.ste import StraightThrough

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / 'core' / 'prunax'] + sorted((ROOT / 'integrations').glob('*/prunax_*'))
# The NamedTuple API is public despite its underscore.
NAMEDTUPLE_API = {'_replace', '_fields', '_asdict', '_make', '_field_defaults'}


def _is_module(package: str, name: str) -> bool:
  for root in [ROOT / 'core'] + sorted((ROOT / 'integrations').glob('*')):
    base = root.joinpath(*package.split('.'))
    if (base / f'{name}.py').exists() or (base / name / '__init__.py').exists():
      return True
  return False


def _private_uses_across_modules(path: pathlib.Path) -> list[str]:
  """``from prunax... import _x`` and ``module._x`` for an imported prunax module."""
  tree = ast.parse(path.read_text())
  modules = set()  # local names bound to prunax modules (or packages)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('prunax'):
      for alias in node.names:
        # A package-private module (``_checks``, ``_xla_workarounds``) may be imported.
        if _is_module(node.module, alias.name):
          pass
        elif alias.name.startswith('_') and not alias.name.startswith('__'):
          found.append(f'{path.name}:{node.lineno} imports {node.module}.{alias.name}')
        modules.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('prunax'):
          modules.add((alias.asname or alias.name).split('.')[0])
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith('_')
      and not node.attr.startswith('__')
      and node.attr not in NAMEDTUPLE_API
      and isinstance(node.value, ast.Name)
      and node.value.id in modules
    ):
      found.append(f'{path.name}:{node.lineno} uses {node.value.id}.{node.attr}')
  return found


def test_no_private_names_across_modules():
  found = []
  for package in PACKAGES:
    for path in sorted(package.rglob('*.py')):
      found += _private_uses_across_modules(path)
  assert not found, found


def test_the_scan_finds_a_private_call(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(
    'from prunax import selection\nfrom prunax.base_updater import _x\nselection._search(1)\n'
  )
  assert len(_private_uses_across_modules(bad)) == 2


def test_algorithms_are_composed_not_flagged():
  for flag in ('is_ste', 'is_global', 'is_sparse_training', 'scheduler_kind'):
    assert not hasattr(prunax.BaseUpdater, flag), flag
  straight_through = set()
  for name in registry.all_algorithm_names():
    cls = registry.get_algorithm(name)
    assert cls.engine in (engines.masked_training, engines.straight_through), name
    assert isinstance(cls.selection_strategy, (strategies.PerLeaf, strategies.GlobalThreshold))
    if cls.engine is engines.straight_through:
      assert issubclass(cls, StraightThrough), name
      straight_through.add(name)
  assert straight_through == {
    'magnitude_ste',
    'random_ste',
    'autosparse',
    'str',
    'topkast',
    'topkast_ga',
    'sr_ste',
  }
  # The engines branch on no algorithm: their code names no algorithm class.
  code = ast.parse(inspect.getsource(engines))
  names = {n.id for n in ast.walk(code) if isinstance(n, ast.Name)}
  names |= {n.attr for n in ast.walk(code) if isinstance(n, ast.Attribute)}
  for name in registry.all_algorithm_names():
    assert registry.get_algorithm(name).__name__ not in names, name


class _Steps(NamedTuple):
  """A straight-through algorithm's own state: its dense weights and a step count."""

  dense_params: Any
  seen: jax.Array

  params_like = ('dense_params',)


@dataclasses.dataclass(frozen=True)
class _CountingSte(StraightThrough, prunax.MagnitudePruning):
  """STE that counts the steps it saw in its own state (no engine or state change)."""

  def init_algorithm_state(self, params, masks, targets):
    dense = super().init_algorithm_state(params, masks, targets).dense_params
    return _Steps(dense, jnp.zeros([], jnp.int32))

  def before_update(self, algorithm_state, grads, dense, masks, sparse_state, inner):
    return algorithm_state._replace(seen=algorithm_state.seen + 1), grads


def test_a_new_algorithm_with_its_own_state_needs_no_engine_change():
  params = {'w': jnp.arange(1.0, 17.0).reshape(4, 4), 'b': jnp.ones(4)}
  updater = _CountingSte(sparsity=0.5)
  tx = updater.wrap_optax(optax.adam(0.1))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.tree.map(jnp.ones_like, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = params
  for _ in range(3):
    p, state = step(p, state)
  own = prunax.get_sparse_state(state).algorithm_state
  assert isinstance(own, _Steps) and int(own.seen) == 3
  assert isinstance(own.dense_params['b'], optax.MaskedNode)
  # The params are the dense weights under the masks, exactly at the target.
  assert int((p['w'] == 0).sum()) == 8
  np.testing.assert_array_equal(p['w'], jnp.where(p['w'] != 0, own.dense_params['w'], 0))
  # The state round-trips through a checkpointer's dict form, its own part included.
  restored = flax.serialization.from_state_dict(
    tx.init(params), flax.serialization.to_state_dict(state)
  )
  assert int(restored.algorithm_state.seen) == 3
  np.testing.assert_array_equal(restored.algorithm_state.dense_params['w'], own.dense_params['w'])


def test_the_selection_strategy_is_what_the_engine_uses():
  calls = []

  @dataclasses.dataclass(frozen=True)
  class Recording(strategies.PerLeaf):
    def masks(self, updater, scores, sparsities):
      calls.append(sorted(k for k, v in sparsities.items() if v is not None))
      return super().masks(updater, scores, sparsities)

  @dataclasses.dataclass(frozen=True)
  class Mine(prunax.MagnitudePruning):
    selection_strategy = Recording()

  params = {'w': jnp.arange(1.0, 17.0).reshape(4, 4), 'b': jnp.ones(4)}
  tx = Mine(sparsity=0.5).wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert calls == [['w']]
  assert prunax.bool_masks(state, params)['w'].sum() == 8


def test_global_strategy_checks_name_the_updater():
  with pytest.raises(ValueError, match='GlobalMagnitudePruning supports only unstructured'):
    prunax.GlobalMagnitudePruning(sparsity=0.5, sparsity_type='nm_2,4')
  with pytest.raises(ValueError, match='GlobalMagnitudePruning chooses per-layer sparsities'):
    prunax.GlobalMagnitudePruning(sparsity=0.5, sparsity_distribution_fn='erk')


def test_updater_of_a_wrapped_transformation():
  pruner = prunax.RigL(sparsity=0.5, drop_fraction_fn='constant')
  assert engines.updater_of(pruner.wrap_optax(optax.adam(1e-3))) is pruner
  assert engines.updater_of(optax.adam(1e-3)) is None

"""Each compiler workaround of ``prunax._xla_workarounds`` is still needed.

Every test compiles a small representative computation without the workaround and checks
that the problem it prevents is there (a full-size temporary, full-size copies), then
with it that the problem is gone. A failure of the "without" half means an XLA that no
longer needs the workaround: measure, and remove it.
"""

import math
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunax
from prunax import _xla_workarounds
from prunax import masks
from prunax import selection
from tests.core.helpers import distinct_kernels
from tests.core.test_simplification_rounds import simplification_rounds
from tests.xla_env import compile_as_users
from tests.xla_env import cpu_env

CPU_ONLY = pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason='measured on the CPU backend only'
)


def stale(name: str) -> str:
  backend = f'{jax.default_backend()}/jax {jax.__version__}'
  return (
    f'workaround {name} may no longer be needed on {backend} (measured on '
    f'{_xla_workarounds.MEASURED_ON}); measure and remove it'
  )


def compiled(fn, *args):
  # Fresh caches: a function traced with the workaround must not be reused without it.
  jax.clear_caches()
  return compile_as_users(jax.jit(fn).lower(*args))


def temp_bytes(fn, *args) -> int:
  return compiled(fn, *args).memory_analysis().temp_size_in_bytes


SHAPE = (256, 256)
FULL = SHAPE[0] * SHAPE[1] * 4  # bytes of one full-size float32 / uint32 array


def weights():
  return jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)


def magnitude_topk(w):
  return selection.topk_mask(w, w.size // 10, score_fn=jnp.abs)


def hash_topk(w, key_data):
  return selection.topk_mask(selection.Lazy(selection.hash_uniform, w, key_data), w.size // 10)


@CPU_ONLY
def test_loop_variant_still_needed(monkeypatch):
  w = weights()
  with_it = temp_bytes(magnitude_topk, w)
  monkeypatch.setattr(_xla_workarounds, 'loop_variant', lambda x, witness: x)
  without = temp_bytes(magnitude_topk, w)
  # Without it the keys (and positions) are stored once before the loop.
  assert without >= FULL, stale('loop_variant') + f' ({without} temporary bytes without it)'
  assert with_it < FULL // 8, with_it


@CPU_ONLY
def test_opaque_zero_still_needed(monkeypatch):
  w, key_data = weights(), jnp.array([1, 2], jnp.uint32)
  with_it = temp_bytes(hash_topk, w, key_data)
  monkeypatch.setattr(_xla_workarounds, 'opaque_zero', lambda witness: jnp.uint32(0))
  without = temp_bytes(hash_topk, w, key_data)
  # Without it the hashed positions (an iota) are stored once before the loop.
  assert without >= FULL, stale('opaque_zero') + f' ({without} temporary bytes without it)'
  assert with_it < FULL // 8, with_it


def test_loop_variant_and_opaque_zero_pass_values_bit_exact():
  x = jnp.array([np.nan, -0.0, 1e-45, -np.inf], jnp.float32)
  got = jax.jit(_xla_workarounds.loop_variant)(x, jnp.uint32(7))
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(x).view(np.uint32))
  assert int(jax.jit(_xla_workarounds.opaque_zero)(jnp.float32(3.0))) == 0


def autosparse_step(size: int):
  """A jitted AutoSparse + Adam step (params and state donated) on two size x size layers."""
  params = {
    f'l{i}': {
      'kernel': jax.random.normal(jax.random.PRNGKey(i), (size, size)) / size**0.5,
      'bias': jnp.zeros(size),
    }
    for i in range(2)
  }
  tx = prunax.AutoSparse(sparsity=0.9).wrap_optax(optax.adam(1e-3))
  x = jnp.ones((8, size))

  def loss(p):
    h = x
    for i in range(2):
      h = jnp.tanh(h @ p[f'l{i}']['kernel'] + p[f'l{i}']['bias'])
    return jnp.sum(h**2)

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  jax.clear_caches()
  return compile_as_users(jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)))


LAYER = 256


@pytest.fixture(scope='module')
def autosparse_with_workarounds():
  return autosparse_step(LAYER)


def full_size_copies(text: str, size: int) -> int:
  return len(re.findall(rf'= f32\[{size},{size}\]\S* copy\(', text))


@CPU_ONLY
def test_after_still_needed(monkeypatch, autosparse_with_workarounds):
  with_it = full_size_copies(autosparse_with_workarounds.as_text(), LAYER)
  monkeypatch.setattr(_xla_workarounds, 'after', lambda tree, deps: tree)
  without = full_size_copies(autosparse_step(LAYER).as_text(), LAYER)
  # Without it the old dense weights (one per layer) are copied before the in-place update.
  assert without >= 2, stale('after') + f' ({without} full-size copies without it)'
  assert with_it == 0, with_it


@CPU_ONLY
def test_fused_sum_still_needed(monkeypatch, autosparse_with_workarounds):
  with_it = autosparse_with_workarounds.memory_analysis().temp_size_in_bytes
  monkeypatch.setattr(_xla_workarounds, 'fused_sum', jnp.sum)
  without = autosparse_step(LAYER).memory_analysis().temp_size_in_bytes
  # Without it the plain sum's library kernel needs its input (a product) stored.
  full = LAYER * LAYER * 4
  assert without - with_it >= full // 2, (
    stale('fused_sum') + f' ({without} against {with_it} temporary bytes)'
  )


def product_sum(sum_fn):
  """AutoSparse's threshold gradient: the sum of a product of three arrays."""
  return lambda g, w, c: sum_fn(g * jnp.sign(w) * c)


@CPU_ONLY
def test_fused_sum_reduces_in_one_vectorised_loop():
  g, w, c = (jax.random.normal(jax.random.PRNGKey(i), SHAPE) for i in range(3))
  text = compiled(product_sum(_xla_workarounds.fused_sum), g, w, c).as_text()
  # A float and a bool output: XLA's CPU loop of two float outputs (the sums inside and
  # outside a mask, in rows of 16) is scalar, 3-5x slower (benchmarks/workarounds.py).
  outputs = re.findall(r'= \((\w+)\[([\d,]*)\]\S*, (\w+)\[[\d,]*\]\S*\) fusion\(', text)
  # The rows' sums and NaN flags, then theirs: two kernels. The second reduction as two
  # plain ones (until 2026-12) was four, each split into a reduce-window and a reduce.
  assert outputs == [('f32', str(SHAPE[0]), 'pred'), ('f32', '', 'pred')], outputs
  assert 'reduce-window' not in text, text
  # Only the rows' sums are stored: 1/256 of the product here (it was 1/8).
  assert temp_bytes(product_sum(_xla_workarounds.fused_sum), g, w, c) <= FULL // 128


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  shape=st.sampled_from([(), (5,), (7, 9), (64, 48), (3, 130), (2, 8192), (4, 4, 3), (12288,)]),
  special=st.sampled_from([None, np.nan, np.inf, -np.inf, 'both']),
  seed=st.integers(0, 2**31 - 1),
)
def test_fused_sum_is_the_sum(shape, special, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  if special is not None and x.size:
    flat = x.reshape(-1)
    at = rng.integers(0, flat.size, 2)
    flat[at[0]], flat[at[1]] = (np.inf, -np.inf) if special == 'both' else (special, 1.0)
  got = float(jax.jit(_xla_workarounds.fused_sum)(jnp.asarray(x)))
  with np.errstate(invalid='ignore'):  # inf + -inf
    want = x.astype(np.float64).sum()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * math.sqrt(max(x.size, 1)))


def test_fused_sum_traces_its_reductions_once():
  # The reductions' function is one module-level function, so JAX traces it once for all
  # leaves alike; a lambda made at each call was traced again at every pruned leaf.
  def reductions(x):
    eqns = jax.make_jaxpr(_xla_workarounds.fused_sum)(x).jaxpr.eqns
    return [e.params['jaxpr'] for e in eqns if e.primitive.name == 'reduce']

  first, second = reductions(jnp.ones((8, 64))), reductions(jnp.ones((8, 64)))
  assert len(first) == 2 and all(a is b for a, b in zip(first, second, strict=True))


def test_fused_sum_rows():
  rows = _xla_workarounds._sum_rows
  assert rows((2048, 2048)) == (2048, 2048)  # the last axis as it lies
  assert rows((4, 3, 64)) == (4, 3, 64)
  assert rows((6, 12288)) == (6, 3, 4096)  # a long last axis split, the others kept
  assert rows((3, 3, 64, 16)) == (9216 // 1024, 1024)  # a short one: flat rows
  assert rows((7, 9)) == (63,)  # no power of two from 64 divides it: one row
  assert rows(()) == (1,)


def topk_of_leaves(*ws):
  return selection.topk_masks([selection.Lazy(jnp.abs, w) for w in ws], [w.size // 10 for w in ws])


@CPU_ONLY
def test_leaf_row_still_needed(monkeypatch):
  # Leaves selected one by one (stacks of one), their masks evaluated each on its own:
  # the kernels computing the 6 masks from their thresholds' rows.
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', 1)
  ws = [weights() + i for i in range(6)]
  mask = 'pred[' + ','.join(map(str, SHAPE)) + ']'
  with_it = distinct_kernels(compiled(topk_of_leaves, *ws), mask)
  monkeypatch.setattr(_xla_workarounds, 'leaf_row', lambda stacked, i: stacked[i])
  without = distinct_kernels(compiled(topk_of_leaves, *ws), mask)
  assert with_it == 1, f'{with_it} mask kernels for 6 leaves of one shape'
  assert without > with_it, stale('leaf_row') + f' ({without} against {with_it} kernels)'


def rows_of_split(table, ws):
  # What a leaf evaluated on its own does: its mask from its row of a shared table.
  selection.Shared(table)
  return [w > _xla_workarounds.leaf_row(table, i)[0] for i, w in enumerate(ws)]


@CPU_ONLY
def test_split_rows_still_needed(monkeypatch):
  # 4 and 12 leaves of one shape, each compared with its row of a table: with the table
  # split by one kernel, both compile the same kernels (a mask kernel and the split);
  # with a gather per leaf, every leaf adds a gather kernel.
  def kernels():
    counts = []
    for n in (4, 12):
      ws = [weights() + i for i in range(n)]
      table = jnp.arange(3 * n, dtype=jnp.float32).reshape(n, 3)
      counts.append(distinct_kernels(compiled(rows_of_split, table, ws)))
    return counts

  with_it = kernels()
  monkeypatch.setattr(_xla_workarounds, 'split_rows', lambda stacked: None)
  without = kernels()
  assert with_it[0] == with_it[1] == 2, with_it
  assert without[1] - without[0] >= 8, (
    stale('leaf_row') + f' (split rows: {with_it} kernels, gathers: {without})'
  )


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
  dtype=st.sampled_from([np.uint32, np.int32, np.float32, np.uint8]),
  n=st.integers(1, 9),
  width=st.integers(1, 4),
  seed=st.integers(0, 2**31 - 1),
)
def test_split_rows_are_the_rows_bit_exact(dtype, n, width, seed):
  rng = np.random.default_rng(seed)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    table = rng.integers(info.min, info.max, (n, width), dtype=dtype, endpoint=True)
  else:
    table = rng.standard_normal((n, width)).astype(dtype) * 1e30
    table.flat[0] = -np.inf  # the extremes and -0.0 come back as they are
    table.flat[-1] = -0.0

  def read(t):
    _xla_workarounds.split_rows(t)
    return [_xla_workarounds.leaf_row(t, i) for i in range(n)]

  got = jax.jit(read)(jnp.asarray(table))
  for i in range(n):
    assert np.asarray(got[i]).tobytes() == table[i].tobytes(), (i, got[i], table[i])


def pack_alike(*ws):
  # What the engine stores: the packed masks of alike leaves, computed as one stack.
  return masks.pack_masks([selection.Lazy(jnp.greater, w, jnp.float32(0.5)) for w in ws])


@CPU_ONLY
def test_unstack_still_needed(monkeypatch):
  # 8 alike leaves' masks packed by one computation, then split into the leaves' masks:
  # one splitting kernel, where each slice was fused into a kernel of its own.
  ws = [weights() + i for i in range(8)]
  with_it = distinct_kernels(compiled(pack_alike, *ws))
  monkeypatch.setattr(
    _xla_workarounds, 'unstack', lambda stacked: [stacked[j] for j in range(len(stacked))]
  )
  without = distinct_kernels(compiled(pack_alike, *ws))
  assert with_it <= 2, with_it
  assert without - with_it >= 6, stale('unstack') + f' ({without} against {with_it} kernels)'


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
  dtype=st.sampled_from([np.uint32, np.int32, np.float32, np.uint8, np.bool_]),
  n=st.integers(1, 9),
  width=st.integers(1, 4),
  seed=st.integers(0, 2**31 - 1),
)
def test_unstack_gives_the_rows_bit_exact(dtype, n, width, seed):
  rng = np.random.default_rng(seed)
  if dtype == np.bool_:
    table = rng.random((n, width, 3)) < 0.5
  elif np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    table = rng.integers(info.min, info.max, (n, width, 3), dtype=dtype, endpoint=True)
  else:
    table = rng.standard_normal((n, width, 3)).astype(dtype) * 1e30
    table.flat[0] = -np.inf
    table.flat[-1] = -0.0
  got = jax.jit(_xla_workarounds.unstack)(jnp.asarray(table))
  assert len(got) == n
  for i in range(n):
    assert got[i].dtype == table.dtype and got[i].shape == table[i].shape
    assert np.asarray(got[i]).tobytes() == table[i].tobytes(), (i, got[i], table[i])


def test_split_rows_registers_traced_arrays_only():
  table = jnp.arange(6, dtype=jnp.uint32).reshape(3, 2)
  before = len(_xla_workarounds._SPLIT)
  _xla_workarounds.split_rows(table)  # eager: nothing to compile, nothing registered
  assert len(_xla_workarounds._SPLIT) == before
  jaxpr = str(jax.make_jaxpr(lambda t: (_xla_workarounds.split_rows(t), t)[1])(table))
  assert 'reduce' in jaxpr  # traced: split by one variadic reduce


def test_leaf_row_is_the_row():
  stacked = jnp.arange(12, dtype=jnp.uint32).reshape(4, 3)
  for i in range(4):
    np.testing.assert_array_equal(
      jax.jit(_xla_workarounds.leaf_row, static_argnums=1)(stacked, i), stacked[i]
    )


@CPU_ONLY
def test_fused_concat_operands_still_holds(monkeypatch):
  # Selection stacks at most FUSED_CONCAT_OPERANDS alike leaves per counting pass: XLA
  # fuses that stack into the count; a stack of one leaf more is stored in every pass.
  n = _xla_workarounds.FUSED_CONCAT_OPERANDS
  ws = [weights() + i for i in range(n + 1)]
  at_limit = temp_bytes(topk_of_leaves, *ws)  # stacks of n leaves and of 1
  monkeypatch.setattr(_xla_workarounds, 'FUSED_CONCAT_OPERANDS', n + 1)
  over = temp_bytes(topk_of_leaves, *ws)
  assert at_limit < FULL, f'{at_limit} temporary bytes with stacks of {n}'
  assert over >= (n + 1) * FULL, (
    stale('FUSED_CONCAT_OPERANDS') + f' (a stack of {n + 1} leaves holds {over} bytes; '
    'raise the limit if XLA now fuses it)'
  )


def most_gathers_in_a_kernel(compiled) -> int:
  blocks = re.findall(r'^%fused_computation[^\n]*\{\n(.*?)\n\}', compiled.as_text(), re.S | re.M)
  return max((b.count(' gather(') for b in blocks), default=0)


@CPU_ONLY
def test_unfused_concatenate_still_needed(monkeypatch):
  # 16 leaves of one shape: 2 groups of 8 alike leaves, whose samples are gathered (one
  # gather a leaf) and sorted together. With the fillers, each group's sample is one
  # kernel (the same for both, compiled once); without them XLA fused both groups'
  # gathers into the concatenation: a kernel of 16 gathers, of 64 for 64 leaves.
  ws = [weights()[:64, :64] + i for i in range(16)]
  with_it = compiled(topk_of_leaves, *ws)
  masks = jax.jit(topk_of_leaves)(*ws)
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, 'unfused_concatenate')
  without = compiled(topk_of_leaves, *ws)
  assert most_gathers_in_a_kernel(with_it) <= _xla_workarounds.FUSED_CONCAT_OPERANDS
  assert most_gathers_in_a_kernel(without) >= 16, stale('unfused_concatenate')
  jax.clear_caches()
  for got, want in zip(jax.jit(topk_of_leaves)(*ws), masks, strict=True):
    np.testing.assert_array_equal(got, want)


@CPU_ONLY
def test_gathered_sample_still_needed():
  # XLA views a canonicalised gather through a reshape (a transpose under vmap) that its
  # reshape-mover moves down the sample's scores and keys one operation a round of its
  # simplification pipeline, which runs over the whole step: global magnitude (one
  # sample, gathered on its own) and SET (its drop scores read packed masks, sampled for
  # groups of alike leaves under vmap) take more rounds without the barrier.
  steps = ['global_magnitude', 'set']
  with_it = simplification_rounds(steps)
  without = simplification_rounds(steps, workarounds_off='gathered_sample')
  assert max(with_it.values()) <= 3, with_it
  assert min(without.values()) >= 5, stale('gathered_sample') + f' ({without})'


def test_gathered_sample_gives_the_sample_bit_exact():
  w = weights()
  gathered = jax.jit(lambda w: selection.strided_elements(w, 37))(w)
  np.testing.assert_array_equal(gathered, np.asarray(w).reshape(-1)[::37])
  packed = masks.pack_mask(w > 0)
  bits = jax.jit(lambda p: masks._packed_bits_at(p, SHAPE, 37))(packed)
  np.testing.assert_array_equal(bits, np.asarray(w > 0).reshape(-1)[::37])


def test_after_compiles_linearly_in_the_leaves():
  # Each leaf reads the 0 of its own dep. One 0 summed over every dep was fused into every
  # leaf's update (L * L terms): the optimised module of 8, 16, 32 leaves had 370, 1210,
  # 4426 lines; 143, 247, 455 now.
  def lines(n):
    tree = [jnp.full((64, 64), i, jnp.float32) for i in range(n)]
    deps = [jnp.full((), i, jnp.float32) for i in range(n)]
    return compiled(_xla_workarounds.after, tree, deps).as_text().count('\n')

  small, medium, large = lines(8), lines(16), lines(32)
  assert large - medium <= 2.5 * (medium - small), (small, medium, large)


def test_after_passes_values_and_skips_leaves_without_deps():
  tree = {'a': jnp.array([1.0, -2.0]), 'b': jnp.array([[3.0]]), 'c': jnp.array(4.0)}
  deps = {'a': jnp.array([5.0, -6.0]), 'b': None, 'c': jnp.array(7.0)}
  out = jax.jit(_xla_workarounds.after)(tree, deps)
  for name in tree:
    np.testing.assert_array_equal(out[name], tree[name])


def field_sums_temp_bytes(blocked_sum) -> int:
  """Temporaries of summing the 5 packed counts of the rows of 64 leaves of 256 x 256."""
  per_row = jnp.asarray(np.random.default_rng(0).integers(0, 2**30, (64, 2048)), jnp.uint32)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(_xla_workarounds, 'blocked_sum', blocked_sum)
    return temp_bytes(lambda r: selection._field_sums(r, 5), per_row)


@CPU_ONLY
def test_blocked_sum_still_needed():
  extracted = 5 * 64 * 2048 * 4  # the int32 fields of every row
  with_it = field_sums_temp_bytes(_xla_workarounds.blocked_sum)
  assert with_it < extracted / 16, with_it
  without = field_sums_temp_bytes(
    lambda x, dtype, axes=(): jnp.sum(x, axis=(*axes, x.ndim - 1), dtype=dtype)
  )
  assert without >= extracted, stale('blocked_sum') + f' ({without} temporary bytes)'

  def unconverted(x, dtype, axes=()):  # the blocks summed in the result's dtype: merged again
    blocks = x.reshape(*x.shape[:-1], -1, _xla_workarounds.SUM_BLOCK)
    return jnp.sum(jnp.sum(blocks, axis=-1, dtype=dtype), axis=(*axes, x.ndim - 1))

  merged = field_sums_temp_bytes(unconverted)
  assert merged >= extracted, stale('blocked_sum') + f' (no conversion: {merged} bytes)'


@pytest.mark.parametrize('shape', [(3, 64), (2, 5, 33), (7,), (4, 31)])
def test_blocked_sum_is_the_sum(shape):
  x = np.random.default_rng(len(shape)).integers(0, 2**20, shape).astype(np.uint32)
  got = jax.jit(lambda x: _xla_workarounds.blocked_sum(x, jnp.int32))(x)
  assert got.dtype == jnp.int32 and got.shape == shape[:-1]
  np.testing.assert_array_equal(got, x.astype(np.int64).sum(-1))
  with jax.enable_x64(True):  # the dtype asked for, not the wider default integer
    assert _xla_workarounds.blocked_sum(jnp.asarray(x), jnp.int32).dtype == jnp.int32


@pytest.mark.parametrize(('shape', 'axes'), [((3, 4, 64), (1,)), ((2, 5, 3, 33), (1, 2))])
@pytest.mark.parametrize('off', [False, True])
def test_blocked_sum_sums_further_axes(shape, axes, off, monkeypatch):
  if off:
    monkeypatch.setenv('PRUNAX_XLA_WORKAROUNDS_OFF', 'blocked_sum')
  x = np.random.default_rng(len(shape)).integers(0, 2**20, shape).astype(np.uint32)
  got = jax.jit(lambda x: _xla_workarounds.blocked_sum(x, jnp.int32, axes))(x)
  np.testing.assert_array_equal(got, x.astype(np.int64).sum((*axes, len(shape) - 1)))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
  lead=st.integers(1, 3),
  before=st.integers(1, 70),
  width=st.integers(1, 40),
  sum_before=st.booleans(),
)
def test_blocked_sum_of_any_short_or_long_last_axis_is_exact(lead, before, width, sum_before):
  # A last axis shorter than a block takes entries of the axis before it into its blocks
  # when that axis is summed too; any divisor of it may be used.
  shape = (lead, before, width)
  x = np.random.default_rng(before * 41 + width).integers(0, 2**20, shape).astype(np.uint32)
  axes = (1,) if sum_before else ()
  got = _xla_workarounds.blocked_sum(jnp.asarray(x), jnp.int32, axes)
  np.testing.assert_array_equal(got, x.astype(np.int64).sum((*axes, 2)))


def large_relayouts(fn, *args, at_least: int) -> list[str]:
  """Transposes and copies of at least ``at_least`` elements in ``fn``'s optimised HLO."""
  found = re.findall(r'= \w+\[([\d,]*)\]\S* (transpose|copy)\(', compiled(fn, *args).as_text())
  return [
    f'{op} of [{dims}]'
    for dims, op in found
    if np.prod([int(d) for d in dims.split(',') if d]) >= at_least
  ]


@pytest.mark.parametrize(
  'shape', [(1, 2048, 16), (2, 64, 16, 8), (1, 1024, 24), (3, 256, 12), (1, 512, 6), (2, 96, 4)]
)
def test_row_sums_of_a_short_last_axis_are_read_in_place(shape):
  # Keys whose last axis holds 1-31 rows of 32 (a 2048 x 512 leaf: 16) were summed with
  # their longest row axis moved last, a transposed read 12% slower than in place (those
  # of fewer than 8 rows until the in-place read stopped crashing the CPU compiler).
  per_row = np.random.default_rng(0).integers(0, 2**30, shape).astype(np.uint32)
  fn = lambda r: selection._field_sums(r, 5)
  assert large_relayouts(fn, per_row, at_least=per_row.size) == []
  fields = (per_row[None] >> (6 * np.arange(5, dtype=np.uint32)).reshape(5, *[1] * len(shape))) & 63
  want = fields.astype(np.int64).sum(tuple(range(2, fields.ndim))).T
  np.testing.assert_array_equal(jax.jit(fn)(per_row), want)


IN_PLACE_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax, prunax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from prunax import _xla_workarounds, selection

# Every input counted in every pass, as when the crash was found: the counts of a pass
# that reads only open searches' rows shapes (in conditionals) do not reach it.
_counts = selection._pass_counts
selection._pass_counts = lambda *args, active=None: _counts(*args)
shapes = {'u': (16, 75), 'v': (6, 24), 'w': (4, 48), 'x': (8, 192)}
mesh = Mesh(np.array(jax.devices()[:3]), ('model',))
params = {n: jax.random.normal(jax.random.PRNGKey(i), s) for i, (n, s) in enumerate(shapes.items())}
params = jax.device_put(params, NamedSharding(mesh, P(None, 'model')))
tx = prunax.SteMagnitudePruning(sparsity=0.7).wrap_optax(optax.sgd(0.1))
state = jax.jit(tx.init)(params)
noise = {n: np.asarray(jax.random.normal(jax.random.PRNGKey(50 + i), s))
         for i, (n, s) in enumerate(shapes.items())}

def step(p, s):
  grads = jax.tree.map(lambda w, z: jnp.sin(3 * w) + 0.1 * z, p, noise)
  u, s = tx.update(grads, s, p)
  return optax.apply_updates(p, u), s

step = jax.jit(step)
for _ in range(3):
  params, state = step(params, state)
jax.block_until_ready(params)
"""


@CPU_ONLY
def test_in_place_blocks_of_4_and_6_compile_in_a_3_device_step():
  # The straight-through step of 3 devices (the leaves of test_sharding_packed.py's
  # three-way split, a jitted init) sums the row sums of the (8, 192) leaf (a last axis
  # of 6) and of the (4, 48) leaf in place. With the brackets narrowed by a reduction
  # over booleans, XLA's CPU code generation compared an i32 with an i8 in that fusion
  # and failed; narrowed elementwise (selection._narrow), the step compiles and runs.
  done = subprocess.run(
    [sys.executable, '-c', IN_PLACE_SCRIPT],
    env=cpu_env(3, users_emitters=True),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]


def test_blocked_sum_refuses_its_input_dtype():
  with pytest.raises(ValueError, match=r"other than the input's \(uint32\), got uint32$"):
    _xla_workarounds.blocked_sum(jnp.ones(40, jnp.uint32), jnp.uint32)


def flag_readers(n, flag_fn):
  """Lines of the optimised module of ``n`` leaves updated under a flag over ``n`` scalars."""

  def step(tree, scalars):
    flag = flag_fn(jnp.all(jnp.stack([jnp.isfinite(s * 2.0 + 1.0) for s in scalars])))
    return [jnp.where(flag, t * 3.0, t) for t in tree]

  tree = [jnp.full((64, 64), i, jnp.float32) for i in range(n)]
  scalars = [jnp.full((), i, jnp.float32) for i in range(n)]
  return compiled(step, tree, scalars).as_text().count('\n')


@CPU_ONLY
def test_shared_flag_still_needed():
  # Without it the flag's computation is fused into every reader: quadratic growth.
  grow = lambda fn: (
    (flag_readers(32, fn) - flag_readers(16, fn)) / (flag_readers(16, fn) - flag_readers(8, fn))
  )
  assert grow(_xla_workarounds.shared_flag) <= 2.5
  assert grow(lambda flag: flag) >= 3, stale('shared_flag')


def test_shared_flag_is_the_flag():
  for flag in (True, False):
    assert bool(jax.jit(_xla_workarounds.shared_flag)(jnp.bool_(flag))) is flag


# ------------------------------------------------------ switching workarounds off by name


def primitives(fn, *args) -> set[str]:
  jax.clear_caches()  # traced afresh under the variable's current value
  return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


SWITCHED = {
  # name: (computation, its arguments, a primitive only the workaround adds)
  'loop_variant': (
    _xla_workarounds.loop_variant,
    (jnp.ones(3), jnp.uint32(1)),
    'optimization_barrier',
  ),
  'opaque_zero': (_xla_workarounds.opaque_zero, (jnp.ones(3),), 'optimization_barrier'),
  'leaf_row': (
    lambda s: _xla_workarounds.leaf_row(s, 1),
    (jnp.ones((3, 2)),),
    'gather',  # stacked[1] is a slice
  ),
  'after': (_xla_workarounds.after, ([jnp.ones(3)], [jnp.ones(())]), 'min'),
  'shared_flag': (_xla_workarounds.shared_flag, (jnp.bool_(True),), 'exp'),
  'blocked_sum': (
    lambda x: _xla_workarounds.blocked_sum(x, jnp.int32),
    (jnp.arange(96, dtype=jnp.uint32).reshape(2, 48),),
    'reshape',  # into blocks (padded); jnp.sum reshapes nothing
  ),
  'fused_sum': (
    _xla_workarounds.fused_sum,
    (jnp.ones(32),),
    'reduce',  # the two-output reduction; jnp.sum is reduce_sum
  ),
  'unstack': (_xla_workarounds.unstack, (jnp.ones((3, 2)),), 'reduce'),  # else slices
  'unfused_concatenate': (
    lambda a, b: _xla_workarounds.unfused_concatenate([a, b])[:5],
    (jnp.ones((2, 3)), jnp.zeros((3, 3))),
    'broadcast_in_dim',  # the filler rows
  ),
  'gathered_sample': (_xla_workarounds.gathered_sample, (jnp.ones(3),), 'optimization_barrier'),
}


@pytest.mark.parametrize('name', sorted(SWITCHED))
def test_each_workaround_switches_off_by_name_alone(monkeypatch, name):
  fn, args, marker = SWITCHED[name]
  on = fn(*args)
  assert marker in primitives(fn, *args)
  others = [n for n in _xla_workarounds.NAMES if n != name]
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, ','.join(others))
  assert marker in primitives(fn, *args), f'{name} switched off by {others}'
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, f' {name} ')
  assert marker not in primitives(fn, *args)
  for got, want in zip(jax.tree.leaves(fn(*args)), jax.tree.leaves(on), strict=True):
    np.testing.assert_array_equal(got, want)


def test_fused_concat_operands_switches_off_to_one_stack(monkeypatch):
  ws = [
    selection.Lazy(jnp.abs, jnp.ones((4, 4)))
    for _ in range(_xla_workarounds.FUSED_CONCAT_OPERANDS + 3)
  ]
  assert [len(g) for g in selection._alike_groups(ws)] == [6, 5]
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, 'FUSED_CONCAT_OPERANDS')
  assert _xla_workarounds.fused_concat_operands() is None
  assert [len(g) for g in selection._alike_groups(ws)] == [11]


@CPU_ONLY
def test_all_switched_off_changes_compilation_not_values(monkeypatch):
  ws = [weights() + i for i in range(3)]
  with_them = temp_bytes(topk_of_leaves, *ws)
  masks = jax.jit(topk_of_leaves)(*ws)
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, 'all')
  without = temp_bytes(topk_of_leaves, *ws)
  assert with_them < FULL <= without, (with_them, without)  # the keys stored before the loop
  jax.clear_caches()
  for got, want in zip(jax.jit(topk_of_leaves)(*ws), masks, strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('value', ['leaf_rows', 'all,fused_masked_sum', 'ALL'])
def test_unknown_workaround_name_is_refused(monkeypatch, value):
  monkeypatch.setenv(_xla_workarounds.OFF_VARIABLE, value)
  with pytest.raises(ValueError, match=r'valid are "all" or .*loop_variant, opaque_zero'):
    _xla_workarounds.switched_off('leaf_row')

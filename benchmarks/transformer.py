"""A Flax transformer LM, unrolled and scanned: compile time, step time and temporaries.

Run from the repository root::

  python -m benchmarks.transformer                  # 12 blocks, d_model 256, 4 heads, MLP 1024
  python -m benchmarks.transformer --blocks 4 --repeats 3 --algorithms magnitude,rigl
  python -m benchmarks.transformer --instant        # one-shot instant_sparsify instead
  python -m benchmarks.transformer --phases --layouts scanned   # JAX and XLA apart
  python -m benchmarks.transformer --phases --leaves stacked    # only the blocks' leaves

The model (pre-LN decoder blocks, vocabulary 4096, sequence 128) has over 100 prunable
leaves unrolled; scanned (``nn.scan``) its blocks are a handful of stacked leaves, declared
with ``layer_axes={'ScanBlock_0/.*': 0}``. For each
layout and algorithm the pruned train step (Adam, sparsity 0.9, mask update every 10
steps) is compared with the dense step of the same model in the same run:

* compile: seconds of ``jit(step).lower(...).compile()`` with caches cleared;
* step: the fastest of 3 chained calls, with the step counter set so that the call does
  (``update``) or does not (``no update``) compute new masks (with ``--steps-only``,
  the ``update`` steps are training's mask updates from step 40 on, each after the 9
  steps before it: ``benchmarks.run.KINDS``);
* temporaries: ``compiled.memory_analysis().temp_size_in_bytes``.

Ratios are pruned / dense, min / median / max over ``--repeats``. ``--steps-only`` compiles
every step once and times them alternated within each repeat (dense, then each pruned
step, each the fastest of ``--calls`` chained calls), which holds up better on a machine
whose speed drifts between compilations; it prints step ratios only. ``--instant`` times
``instant_sparsify`` (one-shot magnitude and global magnitude at 0.5, caches cleared
before the first call) on the unrolled model instead: the first call (trace, compile,
run) and the fastest of ``--repeats`` calls after it.

``--phases`` times the compile in its two parts instead, as ``benchmarks.compile_time
--phases`` does for MLPs: JAX's trace and lowering (``jit(step).lower(...)``) and XLA's
compile (``.compile()``), dense and pruned alternated in every repeat. ``--leaves
stacked`` prunes only the leaves with a layer axis (the scanned blocks' leaves; none
unrolled) and ``--leaves unstacked`` only the others (embedding, output layer), with the
default filter (2 or more dimensions per layer) otherwise: what each group's selection
adds to a scanned model's compile (the two groups run a selection loop each). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import prunax
from benchmarks import run
from benchmarks.compile_time import lowered_phases
from benchmarks.compile_time import machine
from benchmarks.compile_time import phase_cells
from benchmarks.run import run_steps
from prunax import sparsity_distributions
from prunax import sparsity_schedules as sched

VOCAB, SEQ = 4096, 128


class Block(nn.Module):
  d_model: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
      h, h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2]))
    )
    h = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d_model)(h), None


class LM(nn.Module):
  blocks: int
  d_model: int = 256
  heads: int = 4
  mlp: int = 1024
  scanned: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.d_model)(tokens)
    if self.scanned:
      stack = nn.scan(
        Block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        length=self.blocks,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = stack(self.d_model, self.heads, self.mlp)(x, None)
    else:
      for _ in range(self.blocks):
        x, _ = Block(self.d_model, self.heads, self.mlp)(x)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


LEAVES = ('all', 'stacked', 'unstacked')


def algorithms(layer_axes, leaves: str = 'all'):
  """``{name: (pruner, has_updates)}``; ``leaves`` (:data:`LEAVES`): which of the leaves
  the default filter selects are pruned, all, those with a layer axis in ``layer_axes``,
  or the others."""
  poly = sched.PolynomialSchedule(update_freq=10, update_start_step=0, update_end_step=1000)
  periodic = sched.PeriodicSchedule(update_freq=10, update_start_step=0, update_end_step=1000)
  common = dict(layer_axes=layer_axes)
  if leaves != 'all':
    common['sparsity_distribution_fn'] = _only(layer_axes, leaves)
  pruned = dict(sparsity=0.9, **common)
  return {
    'magnitude': (prunax.MagnitudePruning(scheduler=poly, **pruned), True),
    'global_magnitude': (prunax.GlobalMagnitudePruning(scheduler=poly, **pruned), True),
    'set': (prunax.SET(scheduler=periodic, **pruned), True),
    'rigl': (prunax.RigL(scheduler=periodic, **pruned), True),
    'magnitude_ste': (prunax.SteMagnitudePruning(scheduler=poly, **pruned), False),
    'sr_ste': (prunax.SRSTE(**common), False),
    'autosparse': (prunax.AutoSparse(**common), False),
  }


def _only(layer_axes, leaves: str):
  """The uniform distribution over the stacked (``leaves='stacked'``) or the other leaves
  the default filter selects."""
  if leaves not in LEAVES[1:]:
    raise ValueError(f'leaves must be one of {LEAVES}, got {leaves!r}.')
  patterns = list(layer_axes or {})

  def keep(name, leaf) -> bool:
    stacked = any(sparsity_distributions.matching_names(p, [str(name)]) for p in patterns)
    return sparsity_distributions.default_filter(name, leaf) and stacked == (leaves == 'stacked')

  return functools.partial(sparsity_distributions.uniform, filter_fn=keep)


def setup(blocks: int, layout: str, tokens):
  """``(model, params, layer_axes)`` of the LM of ``blocks`` blocks, ``'unrolled'`` or
  ``'scanned'``, initialised on ``tokens``."""
  if layout not in ('unrolled', 'scanned'):
    raise ValueError(f'layout must be unrolled or scanned, got {layout!r}.')
  model = LM(blocks, scanned=layout == 'scanned')
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1])['params'])
  # flax's attention and Dense layers carry no logical axis names, so the scanned
  # block's layer axis is declared (layer_axes_from_flax reads it where they do).
  layer_axes = {'ScanBlock_0/.*': 0} if layout == 'scanned' else None
  return model, params, layer_axes


def tokens_of(batch: int):
  """A fixed batch of ``SEQ + 1`` tokens per sequence."""
  return jax.random.randint(jax.random.PRNGKey(1), (batch, SEQ + 1), 0, VOCAB)


def step_kinds(has_updates: bool) -> dict:
  """The steps timed per algorithm: name -> ``(count, every)`` of ``run.KINDS`` (the step
  counter set before each call, or None for training's own steps, of which every
  ``every``-th is timed; mask updates from ``run.UPDATE_AT`` on)."""
  if has_updates:
    return {'no update': run.KINDS['no mask update'], 'update': run.KINDS['mask update']}
  return {'every step': run.KINDS['every step']}


def make_loss(model):
  """The LM's loss ``f(params, tokens)``: next-token cross-entropy over the batch."""

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  return loss


def make_step(model, tx):
  loss = make_loss(model)

  def step(params, state, tokens):
    grads = jax.grad(loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def measure(model, tx, params, tokens, count=None, calls=3):
  state = tx.init(params)
  step = make_step(model, tx)
  jax.clear_caches()
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  _, _, best = run_steps(compiled, jax.tree.map(jnp.copy, params), state, tokens, calls, count)
  return compile_s, best, temp


def alternated_steps(model, params, tokens, entries, repeats: int, calls: int):
  """Per entry ``(key, tx, (count, every))`` (:func:`step_kinds`): the pruned / dense step
  ratios over ``repeats`` (returned by key, with the dense step's ms), every step
  compiled once and the steps timed one after another within each repeat."""
  programs = {}
  for key, tx, (count, every) in [(None, optax.adam(1e-3), (None, 1))] + entries:
    state = tx.init(params)
    compiled = jax.jit(make_step(model, tx), donate_argnums=(0, 1))
    compiled = compiled.lower(params, state, tokens).compile()
    p = jax.tree.map(jnp.copy, params)
    if every > 1:  # mask updates: timed from the one at run.UPDATE_AT of training on
      p, state = run.trained_until(compiled, p, state, tokens)
    programs[key] = [compiled, p, state, count, every]
  ratios = {key: [] for key in programs if key is not None}
  dense_ms = []
  for _ in range(repeats):
    best = {}
    for key, program in programs.items():
      compiled, p, state, count, every = program
      program[1], program[2], best[key] = run.time_calls(
        compiled, p, state, tokens, calls, count, every
      )
    dense_ms.append(best[None] * 1e3)
    for key in ratios:
      ratios[key].append(best[key] / best[None])
  return ratios, dense_ms


def fmt(xs, digits: int = 2):
  return ' / '.join(f'{x:.{digits}f}' for x in (min(xs), statistics.median(xs), max(xs)))


def instant(params, repeats):
  """Seconds of ``instant_sparsify``: the first call, then the fastest later one."""
  print('| algorithm | first call s | later call s (fastest) |')
  print('|---|---|---|')
  for name, pruner in (
    ('magnitude', prunax.MagnitudePruning(sparsity=0.5)),
    ('global_magnitude', prunax.GlobalMagnitudePruning(sparsity=0.5)),
  ):
    jax.clear_caches()
    times = []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      jax.block_until_ready(pruner.instant_sparsify(params))
      times.append(time.perf_counter() - start)
    print(f'| {name} | {times[0]:.2f} | {min(times[1:]):.3f} |', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--blocks', type=int, default=12)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--layouts', default='scanned,unrolled')
  parser.add_argument(
    '--algorithms', default='magnitude,global_magnitude,set,rigl,magnitude_ste,sr_ste,autosparse'
  )
  parser.add_argument('--instant', action='store_true', help='time instant_sparsify only')
  parser.add_argument(
    '--steps-only', action='store_true', help='step ratios only, steps alternated'
  )
  parser.add_argument('--calls', type=int, default=3, help='chained calls per step timing')
  parser.add_argument(
    '--phases', action='store_true', help='JAX (trace + lower) and XLA (compile) apart'
  )
  parser.add_argument('--leaves', default='all', choices=LEAVES, help='which leaves are pruned')
  args = parser.parse_args(argv)
  if args.phases and (args.steps_only or args.instant):
    parser.error('--phases times compiles; it does not combine with --steps-only or --instant.')
  print(
    f'# Transformer LM, {args.blocks} blocks, d_model 256, 4 heads, MLP 1024, vocab '
    f'{VOCAB}, sequence {SEQ}, batch {args.batch}; Adam, sparsity 0.9'
  )
  print(f'jax {jax.__version__}, flax, {machine()}, {time.strftime("%Y-%m-%d")}\n')
  tokens = tokens_of(args.batch)
  if args.phases:
    phases(args, tokens)
    return
  print(
    '| layout | algorithm | step | compile ratio | step ratio | temp ratio | dense compile s '
    '| dense step ms |'
  )
  print('|---|---|---|---|---|---|---|---|')
  if args.instant:
    _, params, _ = setup(args.blocks, 'unrolled', tokens)
    print(f'instant_sparsify, unrolled, {len(jax.tree.leaves(params))} leaves\n')
    instant(params, args.repeats)
    return
  for layout in args.layouts.split(','):
    model, params, layer_axes = setup(args.blocks, layout, tokens)
    n_leaves = len(jax.tree.leaves(params))
    print(f'<!-- {layout}: {n_leaves} leaves -->')
    if args.steps_only:
      entries = []
      for name in args.algorithms.split(','):
        pruner, has_updates = algorithms(layer_axes, args.leaves)[name]
        for kind, timing in step_kinds(has_updates).items():
          entries.append(((name, kind), pruner.wrap_optax(optax.adam(1e-3)), timing))
      ratios, dense_ms = alternated_steps(model, params, tokens, entries, args.repeats, args.calls)
      for (name, kind), rs in ratios.items():
        print(
          f'| {layout} | {name} | {kind} | - | {fmt(rs)} | - | - | '
          f'{statistics.median(dense_ms):.0f} |',
          flush=True,
        )
      continue
    for name in args.algorithms.split(','):
      pruner, has_updates = algorithms(layer_axes, args.leaves)[name]
      for kind, (count, every) in step_kinds(has_updates).items():
        # Compiled at every repeat: chained calls from init, the update's with the
        # counter reset to the first update (see --steps-only for training's updates).
        count = 10 if every > 1 else count
        rc, rs, rt, dc, ds = [], [], [], [], []
        for _ in range(args.repeats):
          d_compile, d_step, d_temp = measure(model, optax.adam(1e-3), params, tokens)
          p_compile, p_step, p_temp = measure(
            model, pruner.wrap_optax(optax.adam(1e-3)), params, tokens, count
          )
          rc.append(p_compile / d_compile)
          rs.append(p_step / d_step)
          rt.append(p_temp / max(d_temp, 1))
          dc.append(d_compile)
          ds.append(d_step * 1e3)
        print(
          f'| {layout} | {name} | {kind} | {fmt(rc)} | {fmt(rs)} | {fmt(rt)} | '
          f'{statistics.median(dc):.2f} | {statistics.median(ds):.0f} |',
          flush=True,
        )


def phases(args, tokens) -> None:
  """The ``--phases`` table: per layout and algorithm, JAX's trace + lowering and XLA's
  compile of the dense and the pruned step, alternated in every repeat."""
  print(f'pruned leaves: {args.leaves}\n')
  print(
    '| layout | algorithm | trace + lower s, dense / pruned (median) | ratio min / median / '
    'max | XLA compile s, dense / pruned (median) | ratio min / median / max |'
  )
  print('|---|---|---|---|---|---|')
  for layout in args.layouts.split(','):
    model, params, layer_axes = setup(args.blocks, layout, tokens)
    for name in args.algorithms.split(','):
      pruner = algorithms(layer_axes, args.leaves)[name][0]
      times = {'dense': [], 'pruned': []}
      for _ in range(args.repeats):
        for key, tx in (
          ('dense', optax.adam(1e-3)),
          ('pruned', pruner.wrap_optax(optax.adam(1e-3))),
        ):
          step = make_step(model, tx)
          times[key].append(lowered_phases(step, params, tx.init(params), tokens))
      print(f'| {layout} | {name} | {phase_cells(times["dense"], times["pruned"])} |', flush=True)


if __name__ == '__main__':
  main()

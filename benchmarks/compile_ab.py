"""XLA compile time of two versions of prunax, alternated in one process.

Compile times on a shared CPU move 20-30% between processes, more than most changes to
what a step compiles. This saves the lowered steps of one checkout, then compiles the
saved steps of two checkouts alternately in one process, so both see the same machine::

  python -m benchmarks.compile_ab save runs/ab/before     # in the checkout before a change
  python -m benchmarks.compile_ab save runs/ab/after      # in the checkout after it
  python -m benchmarks.compile_ab compare runs/ab/before runs/ab/after --repeats 3

``save`` writes the StableHLO of the dense and pruned train steps (Adam, sparsity 0.9)
of the unrolled transformer of ``benchmarks.transformer`` and of an MLP of 64 layers of
256 x 256 (``benchmarks.compile_time``); ``compare`` compiles every step saved in both
folders, repeat after repeat in the same order, and prints min / median / max seconds
per step and the after / before ratio of medians. Only XLA's compile is timed (JAX's
trace and lowering are not: ``benchmarks.compile_time --phases`` times them). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.extend
import jax.numpy as jnp
import optax

from benchmarks import compile_time
from benchmarks import transformer

ALGORITHMS = ('dense', 'magnitude', 'set', 'rigl', 'magnitude_ste')
# Saved on request (--algorithms): in the tables of both models too.
OTHERS = ('global_magnitude', 'sr_ste', 'autosparse')


def lowered_step(model: str, layers: int, algorithm: str):
  """The lowered train step (``jax.stages.Lowered``) of ``algorithm`` (or ``'dense'``,
  adam alone) on ``model``: ``'mlp'`` (``layers`` layers of 256 x 256,
  ``benchmarks.compile_time``) or ``'transformer'`` (``layers`` blocks, unrolled)."""
  tx = optax.adam(1e-3)
  if model == 'transformer':
    tokens = transformer.tokens_of(2)
    net, params, layer_axes = transformer.setup(layers, 'unrolled', tokens)
    if algorithm != 'dense':
      tx = transformer.algorithms(layer_axes)[algorithm][0].wrap_optax(tx)
    step = transformer.make_step(net, tx)
    return jax.jit(step).lower(params, tx.init(params), tokens)
  params = compile_time.mlp_params(layers)
  x = jnp.ones((32, 256))
  if algorithm != 'dense':
    tx = compile_time.updater(algorithm).wrap_optax(tx)

  def step(p, s):
    grads = jax.grad(compile_time.loss)(p, x)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return jax.jit(step).lower(params, tx.init(params))


def _lowered_steps(model: str, algorithms) -> dict[str, str]:
  """``{algorithm: StableHLO text}`` of the train steps of ``model`` (``'transformer'``,
  12 blocks, or ``'mlp64'``)."""
  name, layers = ('transformer', 12) if model == 'transformer' else ('mlp', 64)
  return {a: lowered_step(name, layers, a).as_text() for a in algorithms}


def save(folder: str, algorithms) -> None:
  os.makedirs(folder, exist_ok=True)
  for model in ('transformer', 'mlp64'):
    for name, text in _lowered_steps(model, algorithms).items():
      with open(os.path.join(folder, f'{model}_{name}.mlir'), 'w') as f:
        f.write(text)
      operations = sum(' = ' in line for line in text.splitlines())
      print(f'saved {model} {name}: {operations} lines of StableHLO operations', flush=True)


def _compile(text: str) -> float:
  """Seconds XLA takes to compile the StableHLO ``text`` for one CPU device."""
  # jax has no public call that compiles a saved module; this is what jit's compile calls.
  from jax._src.lib import xla_client

  backend = jax.extend.backend.get_backend()
  devices = xla_client.DeviceList(tuple(backend.devices()[:1]))
  start = time.perf_counter()
  backend.compile_and_load(
    text, executable_devices=devices, compile_options=xla_client.CompileOptions()
  )
  return time.perf_counter() - start


def compare(before: str, after: str, repeats: int) -> None:
  if os.path.realpath(before) == os.path.realpath(after):
    raise SystemExit(f'compare needs two folders, got {before!r} twice')
  names = sorted(set(os.listdir(before)) & set(os.listdir(after)))
  if not names:
    raise SystemExit(f'no saved step is in both {before!r} and {after!r}')
  texts = {(d, n): open(os.path.join(d, n)).read() for d in (before, after) for n in names}
  seconds: dict = {key: [] for key in texts}
  for _ in range(repeats):
    for n in names:
      for d in (before, after):
        seconds[(d, n)].append(_compile(texts[(d, n)]))
  print(f'{compile_time.cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}')
  print('| step | before s (min / median / max) | after s (min / median / max) | after / before |')
  print('|---|---|---|---|')
  for n in names:
    b, a = seconds[(before, n)], seconds[(after, n)]

    def fmt(xs):
      return f'{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}'

    ratio = statistics.median(a) / statistics.median(b)
    print(f'| {n[: -len(".mlir")]} | {fmt(b)} | {fmt(a)} | {ratio:.2f} |', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  s = sub.add_parser('save', help="this checkout's lowered steps")
  s.add_argument('folder')
  s.add_argument('--algorithms', default=','.join(ALGORITHMS))
  c = sub.add_parser('compare', help='compile two saved folders alternately')
  c.add_argument('before')
  c.add_argument('after')
  c.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  if args.command == 'save':
    algorithms = [a for a in args.algorithms.split(',') if a]
    valid = ALGORITHMS + OTHERS
    unknown = sorted(set(algorithms) - set(valid))
    if unknown:
      parser.error(f'--algorithms: unknown {unknown}; valid are {", ".join(valid)}')
    save(args.folder, algorithms)
  else:
    if args.repeats < 1:
      parser.error(f'--repeats must be at least 1, got {args.repeats}')
    compare(args.before, args.after, args.repeats)


if __name__ == '__main__':
  main()

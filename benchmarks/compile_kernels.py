"""Where XLA's compile time of a train step goes: its HLO passes and every kernel's code.

Run from the repository root::

  python -m benchmarks.compile_kernels                      # MLP of 64 layers: dense, magnitude
  python -m benchmarks.compile_kernels --layers 4 --algorithms dense,magnitude,rigl --top 15
  python -m benchmarks.compile_kernels --model transformer --algorithms dense,magnitude

``benchmarks.compile_time`` says how much longer a pruned step compiles than the dense
one; this says where that time goes. Every step (Adam, sparsity 0.9; the models and
algorithms of ``benchmarks.compile_time`` and ``benchmarks.transformer``, unrolled) is
compiled in a child process whose XLA logs its own timers: XLA's CPU compiler logs, at
verbosity 1 (``TF_CPP_VMODULE``), the time of its HLO passes, of the code generation
("JIT"), and of every kernel's LLVM compile. Per step it prints the XLA compile seconds
(``lowered.compile()``), the HLO passes' and the code generation's parts, the kernels
compiled and the sum of their LLVM seconds (kernels compile on XLA's threads: the sum can
exceed the code generation's wall time), the slowest HLO passes (a pipeline's time
includes its passes'), the kernels' LLVM seconds by the code that made them (the innermost
``--depth`` prunax functions on the stack that traced the fusion's root, read from the
stack frames XLA keeps in the compiled HLO), and the slowest kernels with their
result types and instruction counts, read from the compiled HLO. One compile per step:
timings on a shared CPU move 10-30% between runs; the kernel counts and sizes do not.
Nothing is asserted. The log lines read are those of jaxlib 0.10.2's XLA; an XLA that
logs other lines stops the tool with an error that says so.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

TIMERS = 'cpu_compiler=1,hlo_pass_pipeline=1,ir_compiler=1'
_TIME = re.compile(r' time: ([\d.]+) (us|ms|s) ')
_UNITS = {'us': 1e-6, 'ms': 1e-3, 's': 1.0}
_METADATA = re.compile(r', metadata=\{[^}]*\}')


def _seconds(line: str) -> float:
  m = _TIME.search(line)
  if m is None:
    raise ValueError(f'no time in the XLA log line {line!r}')
  return float(m[1]) * _UNITS[m[2]]


def _child(model: str, layers: int, algorithm: str, hlo_path: str) -> None:
  """Compiles the step; writes its optimised HLO to ``hlo_path``, prints its seconds."""
  import time

  from benchmarks import compile_ab

  lowered = compile_ab.lowered_step(model, layers, algorithm)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  with open(hlo_path, 'w') as f:
    f.write(compiled.as_text())
  print(f'compile {seconds}', flush=True)


def _frames(hlo: str) -> Callable[[int], list[tuple[str, str, int]]]:
  """``stack(frame_id)``: the ``(file, function, line)`` of a stack frame of ``hlo`` (the
  tables XLA prints before the computations) and of its callers, innermost first."""

  def table(name: str, pattern: str) -> dict[str, Any]:
    start = hlo.find('\n' + name + '\n')
    if start < 0:
      return {}
    section = hlo[start + len(name) + 2 :].split('\n\n', 1)[0]
    return {m[0]: m[1] if len(m) == 2 else m[1:] for m in re.findall(pattern, section, re.M)}

  files = table('FileNames', r'^(\d+) "([^"]*)"$')
  names = table('FunctionNames', r'^(\d+) "([^"]*)"$')
  locations = table(
    'FileLocations', r'^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)'
  )
  frames = table('StackFrames', r'^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}')

  def stack(frame: int) -> list[tuple[str, str, int]]:
    out, seen = [], set()
    # A frame's parent_frame_id is one more than its parent's id; 0 ends the stack.
    while str(frame) in frames and frame not in seen:
      seen.add(frame)
      location, parent = frames[str(frame)]
      file_id, name_id, line = locations.get(location, ('', '', '0'))
      out.append((files.get(file_id, '?'), names.get(name_id, '?'), int(line)))
      frame = int(parent) - 1
    return out

  return stack


def _origin(stack: list[tuple[str, str, int]], depth: int) -> str:
  """The innermost ``depth`` prunax functions of ``stack`` (``module.function``, innermost
  first), or the innermost frame outside JAX's own modules for code that is not prunax's."""
  ours = [
    f'{os.path.splitext(os.path.basename(f))[0]}.{name.split(".<locals>")[0]}'
    for f, name, _ in stack
    if f'{os.sep}prunax{os.sep}' in f
  ]
  deduplicated = [o for i, o in enumerate(ours) if i == 0 or o != ours[i - 1]]
  if deduplicated:
    return ' < '.join(deduplicated[:depth])
  outside = [(f, n) for f, n, _ in stack if f'{os.sep}jax{os.sep}' not in f]
  if not outside:
    return 'not prunax'
  return f'not prunax: {os.path.basename(outside[0][0])} {outside[0][1]}'


def parse(log: str, hlo: str, depth: int) -> dict:
  """The figures of the last program compiled in ``log`` (the XLA timers' lines) and its
  optimised ``hlo``: ``total``, ``passes`` and ``codegen`` seconds, ``pass_times``
  (seconds by pass name), ``kernels`` (``(seconds, name, result, instructions,
  origin)``, slowest first; the origin is the code that made the kernel's fusion, see
  :func:`_origin`) and ``origins`` (seconds by origin)."""
  lines = log.splitlines()
  totals = [ln for ln in lines if ln.startswith('compile ')]
  runs = [i for i, ln in enumerate(lines) if 'Running HLO passes on [' in ln]
  ends = [i for i, ln in enumerate(lines) if re.search(r'Compiling \[.*\] for CPU using JIT', ln)]
  if not (totals and runs and ends and ends[-1] > runs[-1]):
    raise RuntimeError(
      'the XLA log holds no compile timers of the step (looked for "Running HLO passes on" '
      'and "Compiling [...] for CPU using JIT" lines, as jaxlib 0.10.2 logs them at '
      f'TF_CPP_VMODULE={TIMERS}); this XLA logs differently.'
    )
  first = max([i for i in ends if i < runs[-1]], default=-1) + 1
  pass_times: collections.Counter = collections.Counter()
  for ln in lines[first : runs[-1]]:
    m = re.search(r'HLO pass: (.*?) time:', ln)
    if m:
      pass_times[m[1]] += _seconds(ln)
  text = _METADATA.sub('', hlo)
  bodies = {
    m[1]: m[2].count('\n') + 1
    for m in re.finditer(r'^%([\w.-]+) [^\n]*\{\n(.*?)\n\}', text, re.S | re.M)
  }
  raw = {m[1]: m[2] for m in re.finditer(r'^%([\w.-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.S | re.M)}
  stack = _frames(hlo)
  calls = {}
  for ln in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (.+?) fusion\(.*?calls=%([\w.-]+)', ln)
    if m:
      # The fusion's own frame, else (a fusion XLA made around one operation) its body's.
      frame = re.search(r'stack_frame_id=(\d+)', ln) or re.search(
        r'stack_frame_id=(\d+)', raw.get(m[3], '')
      )
      origin = _origin(stack(int(frame[1])), depth) if frame else 'unknown'
      calls[m[1]] = (m[2], bodies.get(m[3], 0), origin)
  kernels = []
  for ln in lines[runs[-1] : ends[-1]]:
    m = re.search(r'Compiled LLVM module: (\S+)', ln)
    if not m:
      continue
    name = m[1]
    while name.startswith('__compute_module_'):
      name = name[len('__compute_module_') :]
    name = re.sub(r'(_elemental)?_kernel_module$', '', name)
    result, size, origin = calls.get(name, ('-', 0, 'not a fusion'))
    kernels.append((_seconds(ln), name, result, size, origin))
  kernels.sort(reverse=True)
  origins: collections.Counter = collections.Counter()
  for seconds, *_, origin in kernels:
    origins[origin] += seconds
  return {
    'total': float(totals[-1].split()[1]),
    'passes': _seconds(lines[runs[-1]]),
    'codegen': _seconds(lines[ends[-1]]),
    'pass_times': pass_times,
    'kernels': kernels,
    'origins': origins,
  }


def profile(model: str, layers: int, algorithm: str, depth: int) -> dict:
  """:func:`parse` of the step of ``algorithm`` compiled in a child process."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='0', TF_CPP_VMODULE=TIMERS)
  with tempfile.TemporaryDirectory(prefix='prunax-compile-kernels-') as tmp:
    hlo_path = os.path.join(tmp, 'step.hlo')
    code = (
      'import sys; from benchmarks import compile_kernels as c; '
      'c._child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])'
    )
    run = subprocess.run(
      [sys.executable, '-c', code, model, str(layers), algorithm, hlo_path],
      capture_output=True,
      text=True,
      env=env,
      check=False,
    )
    if run.returncode:
      raise RuntimeError(f'compiling the {algorithm} step failed:\n{run.stderr[-3000:]}')
    with open(hlo_path) as f:
      hlo = f.read()
  return parse(run.stderr + run.stdout, hlo, depth)


def report(results: dict[str, dict], top: int, reference: str | None) -> str:
  """Markdown tables of :func:`profile`'s figures per algorithm."""
  names = list(results)
  ref = results.get(reference) if reference else None

  def cell(name, value):
    v = value(results[name])
    shown = f'{v}' if isinstance(v, int) else f'{v:.2f}'
    if ref is None or name == reference or not value(ref):
      return shown
    return f'{shown} ({v / value(ref):.2f}x)'

  rows = [
    ('XLA compile s', lambda r: r['total']),
    ('HLO passes s (XLA\'s "Running HLO passes")', lambda r: r['passes']),
    ('code generation s (XLA\'s "JIT")', lambda r: r['codegen']),
    ('kernels compiled', lambda r: len(r['kernels'])),
    ('LLVM s, sum over kernels', lambda r: sum(k[0] for k in r['kernels'])),
  ]
  out = ['| | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  for label, value in rows:
    out.append(f'| {label} | ' + ' | '.join(cell(n, value) for n in names) + ' |')
  for name in names:
    r = results[name]
    out += ['', f'**{name}**: slowest HLO passes (ms; pipelines include their passes)', '']
    out.append(', '.join(f'{p} {s * 1e3:.0f}' for p, s in r['pass_times'].most_common(top)))
    out += ['', f"**{name}**: kernels' LLVM time by the code that made them", '']
    counts = collections.Counter(k[4] for k in r['kernels'])
    out += ['| code (innermost first) | ms | kernels |', '|---|---|---|']
    for origin, seconds in r['origins'].most_common(top):
      out.append(f'| `{origin}` | {seconds * 1e3:.0f} | {counts[origin]} |')
    out += ['', f'**{name}**: slowest kernels', '']
    out += ['| ms | instructions | result | kernel | code |', '|---|---|---|---|---|']
    for seconds, kernel, result, size, origin in r['kernels'][:top]:
      out.append(f'| {seconds * 1e3:.1f} | {size} | `{result}` | {kernel} | `{origin}` |')
  return '\n'.join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=('mlp', 'transformer'), default='mlp')
  parser.add_argument(
    '--layers', type=int, default=None, help='MLP layers (default 64) or transformer blocks (12)'
  )
  parser.add_argument('--algorithms', default='dense,magnitude')
  parser.add_argument('--top', type=int, default=10, help='rows per ranking')
  parser.add_argument(
    '--depth', type=int, default=2, help='prunax functions (innermost first) naming a kernel'
  )
  args = parser.parse_args(argv)
  layers = args.layers if args.layers is not None else (64 if args.model == 'mlp' else 12)
  if layers < 1:
    parser.error(f'--layers must be at least 1, got {layers}')
  if args.top < 1 or args.depth < 1:
    parser.error(f'--top and --depth must be at least 1, got {args.top} and {args.depth}')
  from benchmarks import compile_time
  from benchmarks import transformer

  table = compile_time.ALGORITHMS if args.model == 'mlp' else transformer.algorithms(None)
  valid = ('dense', *table)
  algorithms = [a for a in args.algorithms.split(',') if a]
  unknown = sorted(set(algorithms) - set(valid))
  if unknown or not algorithms:
    parser.error(f'--algorithms: unknown {unknown or algorithms}; valid are {", ".join(valid)}')
  results = {a: profile(args.model, layers, a, args.depth) for a in algorithms}
  shape = f'{layers} layers of 256 x 256' if args.model == 'mlp' else f'{layers} blocks, unrolled'
  print(f'{compile_time.cpu_model()}, {os.cpu_count()} cores; {args.model}, {shape}')
  print()
  print(report(results, args.top, 'dense' if 'dense' in results else None))


if __name__ == '__main__':
  main()

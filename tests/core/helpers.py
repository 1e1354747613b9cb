"""Helpers of the core tests: a small MLP regression problem, its training loop, mask sizes,
and the child process that runs a script on 8 CPU devices."""

import contextlib
import math
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import optax

from tests.xla_env import child_report
from tests.xla_env import cpu_env


def mlp_params(seed: int = 0, sizes=(12, 16, 8)):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    params[f'layer{i}'] = {
      'kernel': jax.random.normal(keys[i], (a, b)) / jnp.sqrt(a),
      'bias': jnp.zeros(b),
    }
  return params


def distinct_kernels(compiled, shape: str | None = None) -> int:
  """Fused computations of an optimised module that differ other than by names: the
  kernels XLA's CPU backend compiles (it reuses one kernel for identical fusions). With
  ``shape`` (e.g. ``'pred[64,64]'``), only those whose result has that type."""
  blocks = re.findall(
    r'^%fused_computation[^\n]*-> ([^\n]*) \{\n(.*?)\n\}', compiled.as_text(), re.S | re.M
  )
  names = r'%[\w.-]+|param_\d+(\.\d+)?|, metadata=\{[^}]*\}|(calls|to_apply)=%?[\w.-]+'
  return len({re.sub(names, '_', b) for out, b in blocks if shape is None or out == shape})


def packed_mask_nbytes(shape) -> int:
  """Bytes of a 1-bit mask of ``shape`` packed as ``prunax.pack_mask`` documents: the last
  axis (d weights) in gcd(d, 8) blocks of whole bytes (one block if blocks would hold a
  multiple of 8 weights)."""
  d = shape[-1]
  blocks = math.gcd(d, 8) if (d // math.gcd(d, 8)) % 8 else 1
  return math.prod(shape) // d * blocks * -(-(d // blocks) // 8)


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f'layer{i}']['kernel'] + params[f'layer{i}']['bias']
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def make_batch(seed: int = 1, n: int = 32, din: int = 12, dout: int = 8):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kx, (n, din)), jax.random.normal(ky, (n, dout))


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


def make_step(tx, loss=loss_fn):
  """A training step using only tx.update and optax.apply_updates."""

  def step(params, opt_state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def run(tx, params, steps: int, jit: bool = True, batch=None, loss=loss_fn):
  batch = make_batch() if batch is None else batch
  step = make_step(tx, loss)
  step = jax.jit(step) if jit else step
  opt_state = tx.init(params)
  history = []
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
    history.append((params, opt_state))
  return params, opt_state, history


def eight_device_report(script: str, timeout: int = 900) -> dict:
  """Runs ``script`` in a child process with 8 CPU devices (XLA's device count is fixed
  when JAX starts) and returns the JSON it prints after ``REPORT``."""
  return child_report(script, cpu_env(8), timeout)


def loops_in(jaxpr) -> int:
  """The loops (``while``, ``scan``) of a jaxpr and of every jaxpr inside it: a selection
  runs two (its search and its tie-break), whatever the number of leaves it selects."""
  count = 0
  for e in jaxpr.eqns:
    count += e.primitive.name in ('while', 'scan')
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      count += loops_in(sub)
  return count


def nnx_scanned_stack(make_layer, rngs, layers: int = 3, features: int = 16, out: int = 4):
  """An nnx model of ``layers`` layers from ``make_layer(rngs)`` stacked by ``nnx.vmap``
  and run by ``nnx.scan`` (the stream is the carry), then a Linear head."""
  from flax import nnx

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=0, out_axes=0)
      def make(rngs):
        return make_layer(rngs)

      self.layers, self.head = make(rngs), nnx.Linear(features, out, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(layer, x):
        return layer(x)

      return self.head(body(self.layers, x))

  return Stack(rngs)


class BoxedScan(nn.Module):
  """An nn.scan of residual MLP layers (hidden width twice the input's) whose kernels
  carry logical axis names and the scan's 'layers' axis (flax boxes: t5x, MaxText)."""

  @nn.compact
  def __call__(self, x):
    class Step(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        init = nn.initializers.lecun_normal()
        d = x.shape[-1]
        up = nn.Dense(2 * d, kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')))
        down = nn.Dense(d, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')))
        return x + down(nn.relu(up(x))), None

    scan = nn.scan(
      Step,
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=3,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    return nn.Dense(8)(scan()(x, None)[0])


@contextlib.contextmanager
def xla_compiles():
  """A list of the seconds of every XLA compile run inside the block (JAX's compile
  events)."""
  seconds = []

  def listen(event, duration, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      seconds.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seconds
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)

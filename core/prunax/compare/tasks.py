"""Tasks: a model, its data and a training recipe, trained identically under every algorithm.

A task is any object with the :class:`Task` protocol. Most users write a
:class:`SupervisedTask` (model, data, optimizer, batch size) and let prunax run the training
loop; tasks with their own loop (federated learning, reinforcement learning) implement
``run`` themselves. Built in: ``digits`` (scikit-learn's embedded digits, a small Flax CNN),
``noisy_digits`` (the same digits shifted, dropped out and noised, a deeper CNN) and ``lm``
(a character-level language model, :mod:`prunax.compare.tasks_lm`; its metric, perplexity,
is lower-is-better).
Installed packages add named tasks through the entry point group ``prunax.compare_tasks``
(the FedJAX adapter adds ``federated_digits``, the Dopamine adapter ``cartpole``); the core
imports no adapter.

A plug-in task is named ``module:function`` (``module`` a dotted module path or a ``.py``
file) or a module with a ``get_task`` function; the function receives the task arguments
of the config (``task_args``) as keyword arguments and returns a task.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax.base_updater import BaseUpdater

PyTree = Any
# observe(step, params): called by a task at the steps it reports (sparsity trace, FLOPs).
Observer = Callable[[int, PyTree], None]


@dataclasses.dataclass
class TrainResult:
  """What a task reports after training one (algorithm, seed) cell.

  Attributes:
    metric: the final quality figure (accuracy, return, perplexity...), in the direction
      of the task's ``higher_is_better``.
    params: the final params, or None if the task cannot expose them.
    opt_state: the final optimizer state (holding the :class:`prunax.SparseState`), or None.
    seconds_per_step: mean wall time of a training step, compilation excluded.
    compile_seconds: time spent compiling (0 when reusing a compiled step).
    sparsity: the final total sparsity, for tasks that give no params (else measured).
  """

  metric: float
  params: PyTree = None
  opt_state: PyTree = None
  seconds_per_step: float = float('nan')
  compile_seconds: float = 0.0
  sparsity: float | None = None


@runtime_checkable
class Task(Protocol):
  """What :func:`prunax.compare.run_comparison` needs from a task."""

  name: str
  metric_name: str
  # An optional attribute ``higher_is_better`` (True when absent) tells whether a higher
  # metric is better (False for a perplexity or a loss).

  def example_params(self) -> PyTree:
    """The params at initialisation, or their shapes (``jax.ShapeDtypeStruct`` leaves), to
    check configs, count FLOPs and plot distributions; None if unknown."""

  def run(
    self, updater: BaseUpdater, seed: int, steps: int, observe: Observer, observe_every: int
  ) -> TrainResult:
    """Trains with ``updater`` for ``steps`` steps, calling ``observe`` every
    ``observe_every`` steps and after the last one."""


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer ``labels``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of ``logits`` whose argmax equals ``labels``."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


@dataclasses.dataclass(eq=False)
class SupervisedTask:
  """A supervised task trained by prunax's own jitted loop.

  Every algorithm and seed sees the same recipe: the inner ``optimizer`` wrapped by the
  algorithm, ``batch_size`` examples per step drawn with the seed (so a seed gives every
  algorithm the same batches), params initialised with the seed.

  Attributes:
    name: task name in reports.
    init_fn: ``init_fn(key) -> params``.
    apply_fn: ``apply_fn(params, x) -> outputs`` (also used to count FLOPs).
    train_data: ``(x, y)`` arrays.
    eval_data: ``(x, y)`` arrays for the final metric.
    optimizer: the inner optax transformation (the training recipe).
    batch_size: examples per step.
    loss_fn: ``loss_fn(outputs, y) -> scalar``.
    metric_fn: ``metric_fn(outputs, y) -> scalar``.
    metric_name: name of the metric in reports.
    higher_is_better: whether a higher metric is better (False for a loss or perplexity).
  """

  name: str
  init_fn: Callable[[jax.Array], PyTree]
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  train_data: tuple[np.ndarray, np.ndarray]
  eval_data: tuple[np.ndarray, np.ndarray]
  optimizer: optax.GradientTransformation
  batch_size: int = 64
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy
  metric_fn: Callable[[jax.Array, jax.Array], jax.Array] = accuracy
  metric_name: str = 'accuracy'
  higher_is_better: bool = True
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
  _init: Any = dataclasses.field(default=None, repr=False)
  _evaluate: Any = dataclasses.field(default=None, repr=False)

  def example_params(self) -> PyTree:
    """Shapes and dtypes of the params (``jax.ShapeDtypeStruct`` leaves; nothing computed)."""
    return jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))

  def example_inputs(self) -> tuple[jax.Array]:
    """One training batch of inputs (for FLOPs counting)."""
    return (jnp.asarray(self.train_data[0][: self.batch_size]),)

  def _train_step(self, tx):
    def step(params, opt_state, x, y):
      grads = jax.grad(lambda p: self.loss_fn(self.apply_fn(p, x), y))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def _compile(self, key: BaseUpdater):
    """AOT-compiles the step and the init of ``key`` (an updater with seed 0).

    The init takes the seed as a traced argument, so one compilation serves every seed;
    an algorithm that needs a Python seed at init falls back to eager initialisation.
    """
    start = time.perf_counter()
    tx = key.wrap_optax(self.optimizer)
    params = self.example_params()
    opt_state = jax.eval_shape(tx.init, params)
    x, y = (
      jax.ShapeDtypeStruct((self.batch_size,) + a.shape[1:], a.dtype) for a in self.train_data
    )
    step = jax.jit(self._train_step(tx)).lower(params, opt_state, x, y).compile()

    def init(p, seed):
      return dataclasses.replace(key, seed=seed).wrap_optax(self.optimizer).init(p)

    try:
      init_fn = jax.jit(init).lower(params, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    except (jax.errors.JAXTypeError, TypeError):  # ConcretizationTypeError is a JAXTypeError
      init_fn = lambda p, seed: (
        dataclasses.replace(key, seed=seed).wrap_optax(self.optimizer).init(p)
      )
    return step, init_fn, time.perf_counter() - start

  def prepare(self, updaters: list[BaseUpdater]) -> None:
    """Compiles the steps of ``updaters`` on 2 threads, before any training (so that step
    times are measured without compilation running beside them)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      for updater in updaters:
        key = dataclasses.replace(updater, seed=0)
        if key not in self._compiled:
          self._compiled[key] = pool.submit(self._compile, key)

  def run(
    self, updater: BaseUpdater, seed: int, steps: int, observe: Observer, observe_every: int
  ) -> TrainResult:
    # The seed reaches the update only through the state (SparseState.rng), so one compiled
    # step serves every seed of an algorithm: the step is compiled for the seed-0 updater.
    key = dataclasses.replace(updater, seed=0)
    if key not in self._compiled:
      self.prepare([updater])
    step_fn, init_fn, compile_seconds = self._compiled[key].result()
    self._compiled[key] = _Done((step_fn, init_fn, 0.0))  # Later seeds: no compilation.
    if self._init is None:
      self._init = jax.jit(self.init_fn)
      x_eval, y_eval = (jnp.asarray(a) for a in self.eval_data)
      self._evaluate = jax.jit(lambda p: self.metric_fn(self.apply_fn(p, x_eval), y_eval))
    params = self._init(jax.random.PRNGKey(seed))
    opt_state = init_fn(params, np.int32(seed))
    x_train, y_train = (jnp.asarray(a) for a in self.train_data)
    batches = np.random.RandomState(seed).randint(
      0, len(self.train_data[1]), size=(steps, self.batch_size)
    )
    elapsed = 0.0
    for t in range(steps):
      # Only the train step is timed (the first batch gather compiles the gather).
      batch = jax.block_until_ready((x_train[batches[t]], y_train[batches[t]]))
      start = time.perf_counter()
      params, opt_state = step_fn(params, opt_state, *batch)
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      if (t + 1) % observe_every == 0 or t + 1 == steps:
        observe(t + 1, params)
    return TrainResult(
      metric=float(self._evaluate(params)),
      params=params,
      opt_state=opt_state,
      seconds_per_step=elapsed / max(steps, 1),
      compile_seconds=compile_seconds,
    )


class _Done:
  """A finished future."""

  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value


# ------------------------------------------------------------------------------ digits


def digits_task(
  batch_size: int = 64, learning_rate: float = 3e-3, test_fraction: float = 0.3, width: int = 16
) -> SupervisedTask:
  """scikit-learn's digits (1797 8x8 images, embedded) with a small Flax CNN and Adam.

  The CNN is conv(width, 3x3) - conv(2*width, 3x3, stride 2) - dense(64) - dense(10) with
  ReLUs; the held-out split (``test_fraction``) is fixed for every algorithm and seed.

  Args:
    batch_size: examples per step.
    learning_rate: Adam's learning rate.
    test_fraction: share of the images held out for the final accuracy.
    width: channels of the first convolution.

  Returns:
    The task.
  """
  import flax.linen as nn
  from sklearn.datasets import load_digits

  class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(2 * width, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, train = order[:n_test], order[n_test:]
  model = DigitsCNN()
  return SupervisedTask(
    name='digits',
    init_fn=lambda key: model.init(key, x[:1]),
    apply_fn=model.apply,
    train_data=(x[train], y[train]),
    eval_data=(x[test], y[test]),
    optimizer=optax.adam(learning_rate),
    batch_size=batch_size,
  )


def noisy_digits_task(
  batch_size: int = 64,
  learning_rate: float = 3e-3,
  test_fraction: float = 0.3,
  width: int = 16,
  copies: int = 4,
  noise: float = 0.25,
) -> SupervisedTask:
  """A harder digits task: scikit-learn's digits upsampled to 16x16, shifted at random in
  a 20x20 canvas, with random contrast, 10% of the pixels dropped and Gaussian noise.

  Generated deterministically (``numpy.random.RandomState(0)``) from the embedded images:
  ``copies`` augmented copies of each training image, two of each held-out image (the split
  is the one of :func:`digits_task`). The CNN is conv(width, 3x3) - conv(2*width, 3x3,
  stride 2) - conv(2*width, 3x3, stride 2) - dense(64) - dense(10) with ReLUs, trained
  with Adam.

  Dense baseline (no_prune, 600 steps, seeds 0-2, defaults): test accuracy about 0.92 (see
  the README's compare section), against about 0.98 on :func:`digits_task`: methods that
  tie on plain digits separate here, most at 90% sparsity and above.

  Args:
    batch_size: examples per step.
    learning_rate: Adam's learning rate.
    test_fraction: share of the images held out for the final accuracy.
    width: channels of the first convolution.
    copies: augmented copies of each training image.
    noise: standard deviation of the Gaussian pixel noise (images lie in [0, 1]).

  Returns:
    The task.
  """
  import flax.linen as nn
  from sklearn.datasets import load_digits

  class NoisyDigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(2 * width, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.Conv(2 * width, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  digits = load_digits()
  images = np.kron(digits.images / 16.0, np.ones((2, 2)))  # 16x16
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, train = order[:n_test], order[n_test:]
  rng = np.random.RandomState(0)

  def augment(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.repeat(index, n)
    out = np.zeros((len(index), 20, 20), np.float32)
    dx, dy = rng.randint(0, 5, size=(2, len(index)))
    contrast = rng.uniform(0.6, 1.0, size=len(index))
    for i, k in enumerate(index):
      out[i, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16] = contrast[i] * images[k]
    out *= rng.uniform(size=out.shape) >= 0.1
    out += noise * rng.standard_normal(out.shape).astype(np.float32)
    return out[..., None], y[index]

  train_data = augment(train, copies)
  eval_data = augment(test, 2)
  model = NoisyDigitsCNN()
  return SupervisedTask(
    name='noisy_digits',
    init_fn=lambda key: model.init(key, train_data[0][:1]),
    apply_fn=model.apply,
    train_data=train_data,
    eval_data=eval_data,
    optimizer=optax.adam(learning_rate),
    batch_size=batch_size,
  )


# --------------------------------------------------------------------- task registry


def scale_schedule(updater: BaseUpdater, factor: int) -> BaseUpdater:
  """``updater`` with its schedule's steps (frequency, start, end, one-shot step) and
  ``training_steps`` (AutoSparse) times ``factor``: a comparison step made of ``factor``
  optimizer updates (for tasks with their own loop, whose step is an epoch or an iteration)."""
  scheduler = updater.scheduler
  changes = {
    f.name: getattr(scheduler, f.name) * factor
    for f in dataclasses.fields(scheduler)
    if f.name in ('update_freq', 'update_start_step', 'update_end_step', 'target_step')
    and getattr(scheduler, f.name) is not None
  }
  updater = dataclasses.replace(updater, scheduler=dataclasses.replace(scheduler, **changes))
  if getattr(updater, 'training_steps', None) is not None:
    updater = dataclasses.replace(updater, training_steps=updater.training_steps * factor)
  return updater


# The entry point group through which installed packages (the host adapters) add tasks:
# ``[project.entry-points."prunax.compare_tasks"] name = "module:factory"``.
ENTRY_POINT_GROUP = 'prunax.compare_tasks'

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
  'digits': digits_task,
  'noisy_digits': noisy_digits_task,
  'lm': lambda **kwargs: importlib.import_module('prunax.compare.tasks_lm').lm_task(**kwargs),
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
  return {
    ep.name: ep
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if ep.name not in BUILTIN_TASKS
  }


def available_tasks() -> list[str]:
  """Names of the built-in tasks and of the tasks installed packages declare in the entry
  point group ``prunax.compare_tasks`` (e.g. ``federated_digits`` from prunax-fedjax,
  ``cartpole`` from prunax-dopamine)."""
  return list(BUILTIN_TASKS) + sorted(_entry_points())


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Callable[..., Task]:
  """The factory an entry point names; a missing or broken one raises naming it."""
  try:
    factory = ep.load()
  except Exception as e:  # ImportError, a missing attribute, or an error in the module.
    dist = ep.dist.name if ep.dist is not None else 'its package'
    raise ValueError(
      f'Task {ep.name!r} ({ep.value}, declared by {dist} in the entry point group '
      f'{ENTRY_POINT_GROUP!r}) cannot be loaded: {type(e).__name__}: {e}. Reinstall {dist} '
      'or fix its declaration.'
    ) from e
  if not callable(factory):
    raise ValueError(f'Task {ep.name!r} ({ep.value}) is not callable: {factory!r}.')
  return factory


def resolve_task_factory(spec: str | Callable[..., Task]) -> Callable[..., Task]:
  """The factory of a task name (built in or from the ``prunax.compare_tasks`` entry point
  group), ``module:function``, ``file.py:function``, a module (its ``get_task``), or a
  callable.

  Raises:
    ValueError: the task cannot be found; the message names what would be valid.
  """
  if callable(spec):
    return spec
  if not isinstance(spec, str) or not spec:
    raise ValueError(f'task must be a name or "module:function", got {spec!r}.')
  if spec in BUILTIN_TASKS:
    return BUILTIN_TASKS[spec]
  installed = _entry_points()
  if spec in installed:
    return _load_entry_point(installed[spec])
  module_name, _, attr = spec.partition(':')
  if not attr and '.' not in spec and not spec.endswith('.py'):
    raise ValueError(
      f'Unknown task {spec!r}; valid tasks are {available_tasks()} or a '
      'plug-in "module:function" / "file.py:function" / module with get_task.'
    )
  try:
    if module_name.endswith('.py'):
      if not os.path.isfile(module_name):
        raise ValueError(f'Task file {module_name!r} does not exist.')
      mod_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(module_name))[0], module_name
      )
      module = importlib.util.module_from_spec(mod_spec)
      mod_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f'Cannot import the task module {module_name!r} of task {spec!r}: {e}. '
      f'Available tasks are {available_tasks()}.'
    ) from e
  attr = attr or 'get_task'
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise ValueError(f'Task module {module_name!r} has no function {attr!r}.')
  return factory


def make_task(spec: str | Callable[..., Task], task_args: dict[str, Any] | None = None) -> Task:
  """Builds the task named by ``spec`` with ``task_args``; checks it has the Task methods."""
  factory = resolve_task_factory(spec)
  try:
    task = factory(**(task_args or {}))
  except TypeError as e:
    raise ValueError(f'Task {spec!r} does not accept task_args {task_args}: {e}') from e
  missing = [m for m in ('name', 'metric_name', 'example_params', 'run') if not hasattr(task, m)]
  if missing:
    raise ValueError(
      f'Task {spec!r} returned {type(task).__name__}, which lacks {missing}; '
      'return a prunax.compare.SupervisedTask or an object with the Task methods.'
    )
  return task

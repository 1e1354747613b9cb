"""Layer-by-layer one-shot pruning of a trained model from calibration batches."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import sparsity_distributions
from prunax.oneshot import capture
from prunax.oneshot import methods
from prunax.sparsity_types import NByM
from prunax.sparsity_types import SparsityType
from prunax.sparsity_types import Unstructured

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One row of the per-layer table.

  Attributes:
    layer: the kernel slice's name, e.g. ``'params/Block_0/Dense_0/kernel'`` or
      ``'params/blocks/mlp/kernel[3]'`` for layer 3 of a stacked leaf.
    shape: the ``(in, out)`` shape the method pruned.
    sparsity: fraction of the slice's weights that the mask removes.
    error: ``||X W - X W'|| / ||X W||`` on the calibration inputs the method saw.
    seconds: wall time of the method (not of calibration).
  """

  layer: str
  shape: tuple[int, int]
  sparsity: float
  error: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class OneShotResult:
  """Pruned params, boolean keep-masks (None for dense leaves) and the per-layer table."""

  params: PyTree
  masks: PyTree
  table: list[LayerReport]


# Compiled calibration passes, reused when the same model is pruned again (other method,
# sparsity or calibration data of the same shapes).
_GRAM_FNS: dict[Any, Callable] = {}
_GRAM_FNS_MAX = 256


def _gram_fn(apply_fn, params, batch, group):
  struct = jax.tree.map(
    lambda x: (np.shape(x), str(x.dtype if hasattr(x, 'dtype') else np.result_type(x))),
    (params, batch),
  )
  key = (
    apply_fn,
    jax.tree.structure(struct),
    tuple(jax.tree.leaves(struct)),
    tuple(s.key for s in group),
  )
  try:
    fn = _GRAM_FNS.get(key)
  except TypeError:  # An unhashable apply_fn: no reuse.
    return capture.make_gram_fn(apply_fn, params, batch, group)
  if fn is None:
    if len(_GRAM_FNS) >= _GRAM_FNS_MAX:
      _GRAM_FNS.pop(next(iter(_GRAM_FNS)))
    fn = _GRAM_FNS[key] = capture.make_gram_fn(apply_fn, params, batch, group)
  return fn


def parse_sparsity_type(spec: str | SparsityType) -> SparsityType:
  """``'unstructured'``, ``'N:M'`` (e.g. ``'2:4'``) or a sparsity type for one-shot pruning.

  N:M groups always run along a kernel's input dimension, i.e. axis 0 of the ``(in, out)``
  matrix: a string gives ``NByM(n, m, axis=0)``; an ``NByM`` must say ``axis=0``.
  """
  if isinstance(spec, SparsityType):
    return spec
  if isinstance(spec, str):
    if spec.lower() == 'unstructured':
      return Unstructured()
    match = re.fullmatch(r'(?:nm_)?(\d+)[:,](\d+)', spec.strip())
    if match:
      return NByM(int(match.group(1)), int(match.group(2)), axis=0)
  raise ValueError(
    f'sparsity_type must be "unstructured", "N:M" (e.g. "2:4"), Unstructured() '
    f'or NByM(n, m, axis=0), got {spec!r}.'
  )


def _targets(params, leaves, names, sites, non_kernel, sparsity, distribution, filter_fn):
  kernel_leaves = {s.leaf for s in sites} - set(non_kernel)
  if isinstance(distribution, str):
    user_filter = filter_fn or (lambda name, leaf: True)

    def kernel_filter(name, leaf):
      return names.index(name) in kernel_leaves and user_filter(name, leaf)

    tree = sparsity_distributions.resolve(distribution)(params, sparsity, filter_fn=kernel_filter)
  elif isinstance(distribution, Mapping):
    tree = sparsity_distributions.CustomMap(distribution)(params, sparsity)
  elif callable(distribution):
    tree = distribution(params, sparsity)
  else:
    raise ValueError(
      f'sparsity_distribution must be "uniform", "erk", a mapping from parameter '
      f'name to sparsity or a callable, got {distribution!r}.'
    )
  values = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
  if len(values) != len(leaves):
    raise ValueError('the sparsity distribution returned a tree that does not match params.')
  out = {}
  for i, value in enumerate(values):
    if value is None:
      continue
    if i not in kernel_leaves:
      why = (
        f'is read by {non_kernel[i]!r}, not only as a matmul or convolution kernel'
        if i in non_kernel
        else 'is not used as the kernel of any matmul or convolution'
      )
      raise ValueError(
        f'parameter {names[i]!r} {why}; one-shot pruning needs the layer '
        f'inputs of a matmul kernel. Leave it out of the sparsity map or filter.'
      )
    out[i] = float(value)
  return out


def prune(
  apply_fn: Callable[[PyTree, Any], Any],
  params: PyTree,
  batches: Iterable[Any],
  *,
  method: str = 'sparsegpt',
  sparsity: float = 0.5,
  sparsity_distribution: str | Mapping[str, float] | Callable = 'uniform',
  sparsity_type: str | SparsityType = 'unstructured',
  sequential: bool = True,
  filter_fn: Callable[[str, Any], bool] | None = None,
  progress: Callable[[LayerReport, int, int], None] | None = None,
  **method_kwargs,
) -> OneShotResult:
  """Prunes every matmul kernel of ``apply_fn`` in one shot from calibration ``batches``.

  Kernels are found by tracing ``apply_fn(params, batch)`` (see :mod:`capture`): the
  kernels of Dense/DenseGeneral/Einsum/Conv layers, attention projections, each layer slice
  of stacked (scanned) kernels and each head of a kernel that a matmul batches over (a
  head's own inputs calibrate it). They are pruned in execution order, one input group at a
  time (kernels reading the same input, like q/k/v, share one calibration pass). With
  ``sequential=True`` (the papers), a group's inputs are computed through the already
  pruned kernels; with ``sequential=False`` through the dense model. Each group costs one
  forward pass over the calibration batches (compiled once per model and group, reused by
  later calls); memory beyond the original and pruned params is one Gram matrix per
  distinct input of the group. A convolution filter is pruned as the ``(window * in, out)``
  matrix applied to its input patches (N:M groups along input channels); grouped
  convolutions are left dense unless named, which is an error naming the op.

  Args:
    apply_fn: ``apply_fn(params, batch)``; for nnx, merge the graphdef with the state.
    params: the trained parameters (any pytree).
    batches: calibration batches (a list or other re-iterable; it is read once per group).
    method: a registered method: ``'magnitude'``, ``'wanda'``, ``'sparsegpt'`` or one added
      with :func:`register_method`.
    sparsity: target sparsity in [0, 1).
    sparsity_distribution: ``'uniform'`` / ``'erk'`` over the kernels (``filter_fn`` narrows
      them), a ``{name or regex: sparsity}`` map, or ``fn(params, sparsity) -> tree``.
    sparsity_type: ``'unstructured'``, ``'N:M'`` or a sparsity type (N:M along the input).
    sequential: calibrate each group through the already pruned model.
    filter_fn: ``fn(name, leaf) -> bool``, kernels to prune (for a named distribution).
    progress: ``fn(report, done, total)`` called after each kernel slice.
    **method_kwargs: passed to the method (e.g. ``blocksize``, ``percdamp``).

  Returns:
    A :class:`OneShotResult`.

  Examples:
    Wanda at 2:4 on one kernel (for a linen model, ``apply_fn`` is
    ``lambda p, x: model.apply({'params': p}, x)``):

    >>> import jax, prunax
    >>> params = {'w': jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
    >>> batches = [jax.random.normal(jax.random.PRNGKey(1), (16, 8))]
    >>> result = prunax.oneshot.prune(
    ...   lambda p, x: x @ p['w'], params, batches, method='wanda', sparsity_type='2:4'
    ... )
    >>> result.masks['w'].reshape(2, 4, 4).sum(axis=1).tolist()  # 2 of every 4 inputs
    [[2, 2, 2, 2], [2, 2, 2, 2]]
    >>> [(r.layer, r.sparsity) for r in result.table]
    [('w', 0.5)]

    Fine-tune on the masks with
    ``prunax.pruning_at_init.FixedMaskSparse(masks=result.masks).wrap_optax(tx)``.
  """
  batches = list(batches)
  if not batches:
    raise ValueError('prune needs at least one calibration batch.')
  method_fn = methods.get_method(method)
  stype = parse_sparsity_type(sparsity_type)
  sites, non_kernel = capture.find_sites(apply_fn, params, batches[0])
  leaves, treedef = jax.tree.flatten(params)
  names = [
    sparsity_distributions.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  targets = _targets(
    params, leaves, names, sites, non_kernel, sparsity, sparsity_distribution, filter_fn
  )
  sites = [s for s in sites if s.leaf in targets]
  groups: dict[int, list[capture.Site]] = {}
  for s in sites:
    groups.setdefault(s.group, []).append(s)

  dense = list(leaves)
  current = list(leaves)
  masks: dict[int, jax.Array] = {i: jnp.ones(np.shape(leaves[i]), bool) for i in targets}
  table: list[LayerReport] = []
  for group in groups.values():
    source = current if sequential else dense
    gram_fn = _gram_fn(apply_fn, params, batches[0], group)
    totals, tokens = None, None
    for batch in batches:
      grams, counts = gram_fn(jax.tree.unflatten(treedef, source), batch)
      totals = grams if totals is None else [a + b for a, b in zip(totals, grams)]
      tokens = counts if tokens is None else [a + b for a, b in zip(tokens, counts)]
    for site, total, n in zip(group, totals, tokens):
      H = 2.0 * total / n
      leaf = jnp.asarray(current[site.leaf])  # numpy leaves too (.at below)
      kernel = leaf[site.slices] if site.index else leaf
      W = capture.kernel_matrix(kernel, site.in_dims)
      start = time.perf_counter()
      new_W, keep = method_fn(W, H, targets[site.leaf], stype, **method_kwargs)
      new_W = jax.block_until_ready(new_W)
      seconds = time.perf_counter() - start
      if not bool(jnp.all(jnp.isfinite(new_W))):
        raise FloatingPointError(
          f'{method} produced non-finite weights for {site.name!r} '
          f'(shape {W.shape}); the Hessian may be singular: raise '
          f'percdamp or use more calibration data.'
        )
      error = float(methods.reconstruction_error(W, new_W, H))
      new_kernel = capture.kernel_from_matrix(new_W, site.in_dims, kernel.shape)
      new_keep = capture.kernel_from_matrix(keep, site.in_dims, kernel.shape)
      if site.index:
        current[site.leaf] = leaf.at[site.slices].set(new_kernel.astype(leaf.dtype))
        masks[site.leaf] = masks[site.leaf].at[site.slices].set(new_keep)
      else:
        current[site.leaf] = new_kernel.astype(leaf.dtype)
        masks[site.leaf] = new_keep
      report = LayerReport(site.name, tuple(W.shape), 1.0 - float(jnp.mean(keep)), error, seconds)
      table.append(report)
      if progress is not None:
        progress(report, len(table), len(sites))
  mask_leaves = [masks.get(i) for i in range(len(leaves))]
  return OneShotResult(
    jax.tree.unflatten(treedef, current), jax.tree.unflatten(treedef, mask_leaves), table
  )


def format_table(table: list[LayerReport]) -> str:
  """The per-layer table as Markdown."""
  lines = [
    '| layer | shape (in, out) | sparsity | rel. error | seconds |',
    '|---|---|---:|---:|---:|',
  ]
  for r in table:
    lines.append(
      f'| {r.layer} | {r.shape[0]}x{r.shape[1]} | {r.sparsity:.4f} | '
      f'{r.error:.4f} | {r.seconds:.3f} |'
    )
  return '\n'.join(lines)

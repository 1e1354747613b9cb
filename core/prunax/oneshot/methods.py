"""One-shot pruning of one layer from its calibration inputs: magnitude, Wanda, SparseGPT.

Every method is a pure function of a 2-D kernel ``W`` of shape ``(in, out)`` (Flax's
layout: ``y = x @ W``) and the layer's input Gram matrix ``H = 2 X^T X / N`` of shape
``(in, in)`` (``X``: the ``N`` calibration tokens of the layer's input, one per row), and
returns ``(new_W, keep_mask)``. The scale of ``H`` does not change any result.

Exact counts, as everywhere in prunax:

* ``magnitude``: ``round(sparsity * in * out)`` zeros in the layer (unstructured).
* ``wanda``: ``round(sparsity * in)`` zeros per output (the paper compares per output row).
* ``sparsegpt``: ``round(sparsity * in * out)`` zeros in the layer, chosen per column block
  as in the paper; block ``[i1, i2)`` prunes ``z(i2) - z(i1)`` weights with
  ``z(c) = round(sparsity * out * c)``, so the blocks add up to the layer's count.
* N:M (:class:`prunax.NByM`): exactly ``n`` of every ``m`` consecutive inputs are kept, for
  every output (groups along the kernel's input dimension, as sparse tensor cores need).

New methods are added with :func:`register_method`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from prunax import selection
from prunax.sparsity_types import NByM
from prunax.sparsity_types import SparsityType
from prunax.sparsity_types import Unstructured
from prunax.sparsity_types import num_zeros

UNSTRUCTURED = Unstructured()
MethodFn = Callable[..., tuple[jax.Array, jax.Array]]
_METHODS: dict[str, MethodFn] = {}


def register_method(name: str, fn: MethodFn | None = None):
  """Registers ``fn(W, H, sparsity, sparsity_type, **kwargs) -> (new_W, keep_mask)``.

  Usable as a decorator (``@register_method('mine')``). ``W`` is ``(in, out)``, ``H`` is
  ``(in, in)``; the method is called eagerly (it may ``jit`` itself).
  """
  if fn is None:
    return functools.partial(register_method, name)
  if not isinstance(name, str) or not name:
    raise ValueError(f'register_method: name must be a non-empty string, got {name!r}.')
  _METHODS[name] = fn
  return fn


def get_method(name: str) -> MethodFn:
  """The registered method called ``name``."""
  if name not in _METHODS:
    raise ValueError(f'Unknown one-shot method {name!r}; valid methods are {sorted(_METHODS)}.')
  return _METHODS[name]


def method_names() -> list[str]:
  """Names of the registered one-shot methods."""
  return sorted(_METHODS)


def _check(W, H, sparsity, sparsity_type) -> None:
  if W.ndim != 2:
    raise ValueError(f'W must be a 2-D (in, out) kernel, got shape {W.shape}.')
  if H is not None and H.shape != (W.shape[0],) * 2:
    raise ValueError(
      f'H must have shape (in, in) = {(W.shape[0],) * 2} for W of shape {W.shape}, got {H.shape}.'
    )
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f'sparsity must be in [0, 1), got {sparsity!r}.')
  if not isinstance(sparsity_type, (Unstructured, NByM)):
    raise ValueError(
      f'one-shot pruning supports Unstructured() or NByM(n, m), got {sparsity_type!r}.'
    )
  if isinstance(sparsity_type, NByM):
    if sparsity_type.axis not in (0, -2):
      raise ValueError(
        f'one-shot N:M groups run along the kernel input dimension (axis 0 of '
        f'the (in, out) kernel), got {sparsity_type!r}; use NByM(n, m, axis=0).'
      )
    NByM(sparsity_type.n, sparsity_type.m, 0).validate(W.shape, 'W')


def _nm_input_mask(scores: jax.Array, nm: NByM) -> jax.Array:
  return selection.n_by_m_mask(scores, nm.n, nm.m, axis=0)


def wanda_scores(W: jax.Array, X: jax.Array) -> jax.Array:
  """Wanda scores ``|W_ij| * ||X_:,i||_2`` (Sun et al., 2023) of an ``(in, out)`` kernel.

  Args:
    W: kernel of shape ``(in, out)``.
    X: calibration inputs of shape ``(tokens, in)``.

  Returns:
    float32 scores of ``W.shape``; they are compared per output (per column of ``W``).
  """
  norms = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=0))
  return jnp.abs(W.astype(jnp.float32)) * norms[:, None]


@functools.partial(jax.jit, static_argnames=('per_output', 'nm'))
def _prune_by_scores(W, scores, zeros, per_output: bool, nm: NByM | None):
  if nm is not None:
    keep = _nm_input_mask(scores, nm)
  elif per_output:
    keep = jax.vmap(lambda s: selection.topk_mask(s, s.size - zeros), in_axes=1, out_axes=1)(scores)
  else:
    keep = selection.topk_mask(scores, scores.size - zeros)
  return jnp.where(keep, W, 0).astype(W.dtype), keep


def _nm_or_none(sparsity, sparsity_type) -> NByM | None:
  return sparsity_type if isinstance(sparsity_type, NByM) and sparsity > 0 else None


def magnitude_prune(
  W: jax.Array,
  H: jax.Array | None = None,
  sparsity: float = 0.5,
  sparsity_type: SparsityType = UNSTRUCTURED,
) -> tuple[jax.Array, jax.Array]:
  """Magnitude pruning of the layer (the baseline): keeps the largest ``|W|``.

  Unstructured: ``round(sparsity * W.size)`` zeros in the layer; ``H`` is not used.
  """
  _check(W, H, sparsity, sparsity_type)
  zeros = num_zeros(float(sparsity), W.size)
  return _prune_by_scores(
    W, jnp.abs(W.astype(jnp.float32)), zeros, False, _nm_or_none(sparsity, sparsity_type)
  )


def wanda_prune(
  W: jax.Array, H: jax.Array, sparsity: float = 0.5, sparsity_type: SparsityType = UNSTRUCTURED
) -> tuple[jax.Array, jax.Array]:
  """Wanda: prunes the smallest ``|W| * ||X||`` of every output (``round(sparsity * in)``).

  ``||X_i||^2`` is ``N / 2 * H_ii``; the constant factor does not change a comparison.
  """
  _check(W, H, sparsity, sparsity_type)
  scores = jnp.abs(W.astype(jnp.float32)) * jnp.sqrt(jnp.diag(H).astype(jnp.float32))[:, None]
  zeros = num_zeros(float(sparsity), W.shape[0])
  return _prune_by_scores(W, scores, zeros, True, _nm_or_none(sparsity, sparsity_type))


def inverse_hessian_cholesky(H: jax.Array, percdamp: float = 0.01):
  """Upper Cholesky factor ``U`` of ``(H + damp I)^-1 = U^T U``, after fixing dead inputs.

  As the reference: an input that is always zero (``H_ii = 0``) gets ``H_ii = 1``, and
  ``damp = percdamp * mean(diag(H))``.

  Returns:
    ``(U, dead)``: the factor and the boolean vector of dead inputs.
  """
  H = H.astype(jnp.float32)
  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(jnp.float32))
  damp = percdamp * jnp.mean(jnp.diag(H))
  H = H + damp * jnp.eye(H.shape[0], dtype=jnp.float32)
  L = jnp.linalg.cholesky(H)
  Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(H.shape[0], dtype=jnp.float32))
  return jnp.linalg.cholesky(Hinv).T, dead


def _block_zero_counts(sparsity: float, rows: int, columns: int, blocksize: int) -> tuple[int, ...]:
  """Zeros of each column block, adding up to ``num_zeros(sparsity, rows * columns)``."""
  ends = list(range(0, columns, blocksize)) + [columns]
  z = [int(num_zeros(float(sparsity), rows * c)) for c in ends]
  return tuple(b - a for a, b in zip(z[:-1], z[1:]))


@functools.partial(jax.jit, static_argnames=('n', 'm', 'blocksize', 'percdamp'))
def _sparsegpt(W, H, counts, n, m, blocksize, percdamp):
  # Reference orientation: rows = outputs, columns = inputs.
  Wt = W.astype(jnp.float32).T
  rows, columns = Wt.shape
  U, dead = inverse_hessian_cholesky(H, percdamp)
  Wt = jnp.where(dead[None, :], 0.0, Wt)
  keep_blocks = []
  for b, i1 in enumerate(range(0, columns, blocksize)):
    i2 = min(i1 + blocksize, columns)
    W1, U1 = Wt[:, i1:i2], U[i1:i2, i1:i2]
    d = jnp.diag(U1)
    if m:  # N:M: chosen group by group inside the column loop below.
      keep1 = jnp.ones(W1.shape, bool)
    else:  # Adaptive mask of the whole block from the current (updated) weights.
      score = jnp.square(W1) / jnp.square(d)[None, :]
      keep1 = selection.topk_mask(score, score.size - counts[b])

    def column(i, carry, d=d, U1=U1):
      W1, keep1, err1 = carry
      if m:

        def select(keep1):
          group = jax.lax.dynamic_slice_in_dim(W1, i, m, axis=1)
          dg = jax.lax.dynamic_slice_in_dim(d, i, m)
          nm = selection.n_by_m_mask(jnp.square(group) / jnp.square(dg)[None, :], n, m, axis=1)
          return jax.lax.dynamic_update_slice_in_dim(keep1, nm, i, axis=1)

        keep1 = jax.lax.cond(i % m == 0, select, lambda k: k, keep1)
      w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
      q = jnp.where(jax.lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False), w, 0.0)
      e = (w - q) / d[i]
      # U1 is upper triangular: row i is zero left of i, so this updates columns >= i only
      # (column i becomes q).
      W1 = W1 - e[:, None] * U1[i][None, :]
      err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, axis=1)
      return W1, keep1, err1

    W1, keep1, err1 = jax.lax.fori_loop(0, i2 - i1, column, (W1, keep1, jnp.zeros_like(W1)))
    Wt = Wt.at[:, i1:i2].set(W1)
    if i2 < columns:  # Lazy batched update of every later column.
      Wt = Wt.at[:, i2:].add(-err1 @ U[i1:i2, i2:])
    keep_blocks.append(keep1)
  keep = jnp.concatenate(keep_blocks, axis=1)
  return jnp.where(keep, Wt, 0.0).T.astype(W.dtype), keep.T


def sparsegpt_prune(
  W: jax.Array,
  H: jax.Array,
  sparsity: float = 0.5,
  sparsity_type: SparsityType = UNSTRUCTURED,
  blocksize: int = 128,
  percdamp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
  """SparseGPT (Frantar & Alistarh, 2023) of an ``(in, out)`` kernel, as the reference code.

  Inputs with ``H_ii = 0`` are dead (their weights are zeroed); ``H`` is dampened by
  ``percdamp`` times its mean diagonal; the upper Cholesky factor of the inverse drives an
  OBS update: columns (inputs) are processed in blocks of ``blocksize``; each block's mask
  keeps the largest ``w^2 / [H^-1]_ii`` (unstructured: per block, over all outputs; N:M:
  per group of ``m`` inputs when the column loop reaches it), every pruned weight's error is
  compensated on the block's later columns at once and on the later blocks lazily, in one
  matmul per block. Computation in float32, result in ``W.dtype``.

  Args:
    W: kernel of shape ``(in, out)``.
    H: Hessian ``2 X^T X / N`` of shape ``(in, in)``.
    sparsity: fraction of weights to prune, in [0, 1) (N:M: any value > 0 switches it on).
    sparsity_type: ``Unstructured()`` or ``NByM(n, m, axis=0)``.
    blocksize: columns per block (a multiple of ``m`` for N:M).
    percdamp: dampening as a fraction of the mean diagonal of ``H``.

  Returns:
    ``(new_W, keep_mask)``, both of ``W.shape``.
  """
  _check(W, H, sparsity, sparsity_type)
  if not (isinstance(blocksize, int) and blocksize >= 1):
    raise ValueError(f'blocksize must be a positive integer, got {blocksize!r}.')
  if not percdamp >= 0:
    raise ValueError(f'percdamp must be >= 0, got {percdamp!r}.')
  n = m = 0
  if isinstance(sparsity_type, NByM) and sparsity > 0:
    n, m = sparsity_type.n, sparsity_type.m
    if blocksize % m:
      raise ValueError(f'blocksize={blocksize} must be a multiple of m={m} for N:M.')
  counts = jnp.asarray(
    _block_zero_counts(0.0 if m else sparsity, W.shape[1], W.shape[0], blocksize), jnp.int32
  )
  return _sparsegpt(W, H, counts, n, m, blocksize, float(percdamp))


register_method('magnitude', magnitude_prune)
register_method('wanda', wanda_prune)
register_method('sparsegpt', sparsegpt_prune)


def gram(X: jax.Array) -> jax.Array:
  """``2 X^T X / N`` in float32 of calibration inputs ``X`` of shape ``(N, in)``."""
  X = X.astype(jnp.float32)
  return 2.0 * (X.T @ X) / X.shape[0]


def reconstruction_error(W: jax.Array, W_new: jax.Array, H: jax.Array) -> jax.Array:
  """``||X W - X W'|| / ||X W||`` (Frobenius) from the Gram ``H`` of the inputs ``X``."""
  W = W.astype(jnp.float32)
  D = W - W_new.astype(jnp.float32)
  num = jnp.sum(D * (H.astype(jnp.float32) @ D))
  den = jnp.sum(W * (H.astype(jnp.float32) @ W))
  return jnp.sqrt(jnp.maximum(num, 0.0) / den)

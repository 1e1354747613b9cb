"""Sparsity structures: which groups of weights are kept or removed together.

Every structure turns a score array and a target sparsity into a boolean keep-mask with an
exact count, documented per structure:

* :class:`Unstructured`: ``round(sparsity * size)`` zeros (round half to even on the
  float32 product; exact for sizes below 2**24), at most ``size - 1``: as in the reference
  implementations, a pruned leaf keeps at least one weight.
* :class:`NByM`: exactly ``n`` nonzeros in every group of ``m`` along ``axis`` (by default
  the input, i.e. contraction, axis of a kernel: ``-2`` for Flax ``(in, out)`` and
  ``(h, w, in, out)`` kernels, as sparse tensor cores need). Its target sparsity is
  ``1 - n/m`` (an updater without a ``sparsity`` takes it; any other target is an error);
  under a gradual schedule N:M switches on at the first mask update whose scheduled
  sparsity is above 0.
* :class:`Block`: ``round(sparsity * num_blocks)`` whole blocks are zero (at least one
  block is kept), where a trailing
  partial block (dimension not a multiple of the block) counts as one block and is scored
  by the mean (or max) over its real elements.
* :class:`Channel`: ``round(sparsity * num_channels)`` whole slices along ``axis`` are zero
  (at least one is kept), scored by the mean score over the slice.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import jax
import jax.numpy as jnp
import numpy as np

from prunax import _checks
from prunax import selection


def num_zeros(sparsity, size: int) -> jax.Array:
  """Number of pruned elements for a (possibly traced) sparsity.

  ``round(sparsity * size)``, but at most ``size - 1``: a pruned leaf keeps at least one
  element (as the reference implementations do), so no layer is cut off entirely.
  """
  most = max(size - 1, 0)
  if isinstance(sparsity, (int, float)):
    return jnp.int32(min(int(np.round(np.float32(sparsity) * np.float32(size))), most))
  zeros = jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
  return jnp.minimum(zeros, most)


class SparsityType:
  """Base class of sparsity structures."""

  def validate(self, shape: tuple[int, ...], name: str) -> None:
    """Raises ValueError if a parameter of ``shape`` cannot take this structure.

    Subclasses extend it (calling ``super().validate``): no structure prunes a scalar or
    an empty parameter.
    """
    if not shape or 0 in shape:
      raise ValueError(
        f'Parameter {name!r} has shape {tuple(shape)}: a scalar or empty '
        'parameter cannot be pruned; leave it out of the custom sparsity map '
        'and the filter_fn (the default filter skips it).'
      )

  def check_sparsity(self, sparsity: float, name: str) -> None:
    """Raises ValueError if this structure cannot reach the target ``sparsity`` of the
    parameter ``name``. Any sparsity in [0, 1) by default."""

  def mask(self, scores: jax.Array, sparsity) -> jax.Array:
    """Boolean keep-mask of ``scores.shape`` for the target ``sparsity``."""
    raise NotImplementedError

  def masks(self, scores: list, sparsities: list, axes: list, lazy: bool = False) -> list:
    """:meth:`mask` of several leaves: ``scores[i]`` at ``sparsities[i]``, every layer on
    its own where ``axes[i]`` (a layer axis) is not None. One leaf at a time by default.
    With ``lazy``, a structure may return :class:`prunax.selection.Lazy` masks (arrays
    are always valid)."""
    del lazy  # Only unstructured selection keeps masks lazy.
    return [
      self.mask(x, s) if a is None else selection.map_layers(lambda y, s=s: self.mask(y, s), a, x)
      for x, s, a in zip(scores, sparsities, axes, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class Unstructured(SparsityType):
  """Individual weights are pruned."""

  def mask(self, scores, sparsity):
    return selection.topk_mask(scores, scores.size - num_zeros(sparsity, scores.size))

  def masks(self, scores, sparsities, axes, lazy=False):
    """The masks of :meth:`mask`, found by one selection loop for all leaves (one per
    number of layers of stacked leaves; see :func:`prunax.selection.topk_masks`); with
    ``lazy``, the masks of leaves without a layer axis are :class:`prunax.selection.Lazy`,
    and so are those of stacked leaves when any scores carry last thresholds
    (``Lazy(near=)``), so that their layers' thresholds are found
    (:func:`prunax.selection.found_thresholds`) for the next selection."""
    if not is_plain_unstructured(self):  # a subclass with its own mask
      return super().masks(scores, sparsities, axes, lazy)

    def group(xs, ss):
      # Leaves of one size at one (shared) sparsity share one count: less to trace and
      # compile per leaf.
      ks = selection.once_per_value(lambda s, n: n - num_zeros(s, n), ss, [x.size for x in xs])
      return selection.topk_masks(xs, ks, lazy=lazy)

    hinted = lazy and any(getattr(x, 'near', None) is not None for x in scores)
    return selection.map_layer_groups(group, axes, scores, sparsities, lazy=hinted)


def is_plain_unstructured(structure: SparsityType) -> bool:
  """Whether ``structure`` is :class:`Unstructured` with its own top-k masks (not a
  subclass that chooses its masks another way)."""
  return isinstance(structure, Unstructured) and type(structure).mask is Unstructured.mask


def _normalize_axis(axis: int, ndim: int, name: str, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(
      f'{what}: axis {axis} is out of range for parameter {name!r} with '
      f'{ndim} dimensions; valid axes are {-ndim}..{ndim - 1}.'
    )
  return axis % ndim


def nm_default_axis(ndim: int) -> int:
  """The default N:M axis of a parameter with ``ndim`` dimensions: its input axis.

  Flax kernels are ``(in, out)`` (Dense) or ``(..., in, out)`` (Conv, DenseGeneral with
  one output axis), so the contraction runs over axis ``-2``; sparse tensor cores and the
  SR-STE reference group weights along it. A 1-D leaf has only axis ``-1``.
  """
  return -2 if ndim >= 2 else -1


@dataclasses.dataclass(frozen=True)
class NByM(SparsityType):
  """N:M structured sparsity: ``n`` nonzeros in every ``m`` consecutive weights along ``axis``.

  Attributes:
    n: weights kept per group.
    m: group size.
    axis: the axis of the groups; None (the default) is the input (contraction) axis of
      a kernel, ``-2`` for ``ndim >= 2`` (see :func:`nm_default_axis`).
  """

  n: int
  m: int
  axis: int | None = None

  def axis_for(self, ndim: int) -> int:
    """The axis the groups run along for a parameter with ``ndim`` dimensions."""
    return nm_default_axis(ndim) if self.axis is None else self.axis

  def __post_init__(self):
    m = _checks.integer(self.m, 'NByM: m', 1)
    # n = 0 would prune every weight.
    n = _checks.integer(self.n, f'NByM({self.n!r}, {m}): n', 1, m)
    object.__setattr__(self, 'm', m)
    object.__setattr__(self, 'n', n)
    if self.axis is not None:  # None: the input axis (see axis_for)
      object.__setattr__(self, 'axis', _checks.integer(self.axis, 'NByM: axis'))

  @property
  def sparsity(self) -> float:
    """The sparsity of N:M: ``1 - n / m``."""
    return 1.0 - self.n / self.m

  def check_sparsity(self, sparsity, name):
    # 0 keeps a leaf dense (e.g. a custom-map entry); other targets cannot be met.
    if sparsity != 0 and not math.isclose(sparsity, self.sparsity, abs_tol=1e-6):
      raise ValueError(
        f'NByM({self.n}, {self.m}) prunes exactly 1 - n/m = {self.sparsity:g} of every '
        f'group of {self.m}, but {name} has target sparsity {sparsity:g}; use sparsity='
        f'{self.sparsity:g} (or leave it unset), 0.0 to keep a parameter dense, or an '
        'N:M pattern with that sparsity.'
      )

  def validate(self, shape, name):
    super().validate(shape, name)
    axis = _normalize_axis(self.axis_for(len(shape)), len(shape), name, 'NByM')
    if shape[axis] % self.m:
      raise ValueError(
        f'NByM({self.n}, {self.m}): axis {self.axis_for(len(shape))} of parameter {name!r} '
        f'with shape '
        f'{tuple(shape)} has size {shape[axis]}, which is not divisible by m={self.m}; '
        f'choose an axis whose size is a multiple of {self.m} (NByM(n, m, axis=...)), or '
        f'leave {name!r} dense by excluding it with the filter_fn, e.g. filter_fn=lambda '
        f'key, p: p.ndim > 1 and p.shape[{self.axis_for(len(shape))}] % {self.m} == 0.'
      )

  def mask(self, scores, sparsity):
    """Keep-mask of N:M groups along :meth:`axis_for` (all True where ``sparsity`` is 0).

    ``sparsity=None`` means N:M's own, ``1 - n/m`` (as jaxpruner's top-k functions read it).

    Raises:
      ValueError: as :meth:`validate`, if ``scores`` cannot take N:M groups of ``m``.
    """
    self.validate(tuple(scores.shape), 'scores')
    nm = selection.n_by_m_mask(
      selection.materialize(scores), self.n, self.m, self.axis_for(scores.ndim)
    )
    if sparsity is None:
      return nm
    return jnp.where(jnp.asarray(sparsity) > 0, nm, True)


class _SelectedTogether(SparsityType):
  """A structure that scores each leaf's groups (blocks, channels) and keeps the best:
  :meth:`_select` gives the masks of several leaves from one selection of all their
  groups' scores (:func:`prunax.selection.topk_masks`), so a model's leaves compile one
  selection loop, not one per leaf."""

  def mask(self, scores, sparsity):
    return self._select([scores], [sparsity])[0]

  def masks(self, scores, sparsities, axes, lazy=False):
    """:meth:`mask` of several leaves, selected together (one selection per number of
    layers of stacked leaves)."""
    if type(self).mask is not _SelectedTogether.mask:  # a subclass with its own mask
      return super().masks(scores, sparsities, axes, lazy)
    return selection.map_layer_groups(self._select, axes, scores, sparsities)

  def _select(self, xs: list, ss: list) -> list:
    """The masks of the leaves ``xs`` at the sparsities ``ss``."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Block(_SelectedTogether):
  """Block sparsity over the trailing ``len(block_shape)`` dimensions.

  A leaf with fewer dimensions than the block uses its trailing block dimensions (a 1-D
  bias with ``Block((4, 4))`` is pruned in runs of 4).

  Attributes:
    block_shape: block size of the trailing dimensions (leading dims use blocks of 1).
    use_avg_pooling: score a block by the mean of its scores (else by their max).
  """

  block_shape: tuple[int, ...]
  use_avg_pooling: bool = True

  def __post_init__(self):
    shape = (
      tuple(self.block_shape)
      if isinstance(self.block_shape, (tuple, list))
      else (self.block_shape,)
    )
    if not shape or not all(
      isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1 for b in shape
    ):
      raise ValueError(f'Block: block_shape must be positive integers, got {self.block_shape!r}.')
    object.__setattr__(self, 'block_shape', tuple(int(b) for b in shape))
    object.__setattr__(
      self, 'use_avg_pooling', _checks.boolean(self.use_avg_pooling, 'Block: use_avg_pooling')
    )

  def _full_block(self, ndim: int) -> tuple[int, ...]:
    # A leaf with fewer dimensions takes the trailing block dims (jaxpruner: a 1-D leaf
    # is one row of blocks of width block_shape[-1]).
    block = self.block_shape[max(len(self.block_shape) - ndim, 0) :]
    return (1,) * (ndim - len(block)) + block

  def validate(self, shape, name):
    super().validate(shape, name)
    if not shape:
      raise ValueError(
        f'Block{self.block_shape} has {len(self.block_shape)} dimensions but '
        f'parameter {name!r} has shape {tuple(shape)}.'
      )
    for d, b in zip(shape, self._full_block(len(shape))):
      if b > d:
        raise ValueError(
          f'Block{self.block_shape} is larger than parameter {name!r} with shape '
          f'{tuple(shape)}; each block dimension must be <= the tensor dimension.'
        )

  def pool(self, scores: jax.Array) -> jax.Array:
    """Scores per block: mean (or max) over the real elements of each block."""
    block = self._full_block(scores.ndim)
    nblocks = [-(-d // b) for d, b in zip(scores.shape, block)]
    pad = [(0, n * b - d) for n, b, d in zip(nblocks, block, scores.shape)]
    inter = [x for pair in zip(nblocks, block) for x in pair]
    axes = tuple(range(1, 2 * scores.ndim, 2))
    scores = scores.astype(jnp.float32)
    if self.use_avg_pooling:
      total = jnp.pad(scores, pad).reshape(inter).sum(axes)
      count = jnp.pad(jnp.ones(scores.shape, jnp.float32), pad).reshape(inter).sum(axes)
      return total / count
    return jnp.pad(scores, pad, constant_values=-jnp.inf).reshape(inter).max(axes)

  def _select(self, xs: list, ss: list) -> list:
    """The masks of leaves ``xs`` at sparsities ``ss``, their blocks selected together."""
    pooled = [self.pool(selection.materialize(x)) for x in xs]
    ks = [p.size - num_zeros(s, p.size) for p, s in zip(pooled, ss, strict=True)]
    keeps = selection.topk_masks(pooled, ks)
    return [self._blocks_to_elements(k, x.shape) for k, x in zip(keeps, xs, strict=True)]

  def _blocks_to_elements(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The mask of the elements of ``shape`` from the mask of its blocks."""
    for axis, b in enumerate(self._full_block(len(shape))):
      keep = jnp.repeat(keep, b, axis=axis)
    return keep[tuple(slice(0, d) for d in shape)]


@dataclasses.dataclass(frozen=True)
class Channel(_SelectedTogether):
  """Whole slices (channels) along ``axis`` are pruned, scored by their mean score."""

  axis: int = -1

  def __post_init__(self):
    object.__setattr__(self, 'axis', _checks.integer(self.axis, 'Channel: axis'))

  def validate(self, shape, name):
    super().validate(shape, name)
    _normalize_axis(self.axis, len(shape), name, 'Channel')

  def _select(self, xs: list, ss: list) -> list:
    """The masks of leaves ``xs`` at sparsities ``ss``, their channels selected together."""
    channels = []
    for x in xs:
      x = selection.materialize(x)
      other = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
      channels.append(jnp.mean(x.astype(jnp.float32), axis=other))
    ks = [c.size - num_zeros(s, c.size) for c, s in zip(channels, ss, strict=True)]
    out = []
    for keep, x in zip(selection.topk_masks(channels, ks), xs, strict=True):
      shape = [1] * len(x.shape)
      shape[self.axis % len(x.shape)] = keep.size
      out.append(jnp.broadcast_to(keep.reshape(shape), x.shape))
    return out


_PATTERNS = {
  r'unstructured': lambda: Unstructured(),
  r'nm_(\d+),(\d+)': lambda n, m: NByM(int(n), int(m)),
  r'block_(\d+(?:,\d+)*)': lambda dims: Block(tuple(int(d) for d in dims.split(','))),
  r'channel_(-?\d+)': lambda axis: Channel(int(axis)),
}


def from_string(spec: str) -> SparsityType:
  """Parses ``'unstructured'``, ``'nm_N,M'``, ``'block_B1,B2,...'`` or ``'channel_AXIS'``."""
  if isinstance(spec, SparsityType):
    return spec
  for pattern, make in _PATTERNS.items():
    match = re.fullmatch(pattern, str(spec).strip().lower())
    if match:
      return make(*match.groups())
  raise ValueError(
    f'Unknown sparsity type {spec!r}; valid forms are "unstructured", '
    f'"nm_N,M" (e.g. "nm_2,4"), "block_B1,B2" (e.g. "block_4,4") and '
    f'"channel_AXIS" (e.g. "channel_-1").'
  )

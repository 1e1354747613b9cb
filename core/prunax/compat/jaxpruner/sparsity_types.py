"""jaxpruner's ``sparsity_types`` module: prunax's sparsity types, except ``NByM``: its
groups run along the last axis by default (``axis=-1``, jaxpruner's default; prunax's is
a kernel's input axis), and ``n > m`` is an error when its masks are made (as in
jaxpruner), not when it is constructed; and ``Block`` on a leaf with more dimensions than
its ``block_shape`` tiles the leading dimensions (jaxpruner's rule)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from prunax import sparsity_types as _st
from prunax.sparsity_types import Channel
from prunax.sparsity_types import SparsityType
from prunax.sparsity_types import Unstructured

__all__ = ['Block', 'Channel', 'NByM', 'NbyM', 'SparsityType', 'Unstructured', 'from_string']


@dataclasses.dataclass(frozen=True)
class NByM(_st.NByM):
  """prunax's N:M type; ``n > m`` (no valid mask) raises ValueError in :meth:`mask`."""

  axis: int | None = -1  # jaxpruner's default: groups along the last axis.

  def _too_many(self) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m)) and (
      1 <= self.m < self.n
    )

  def __post_init__(self):
    if not self._too_many():
      super().__post_init__()

  def mask(self, scores, sparsity):
    """prunax's N:M mask (``sparsity=None``: N:M's own, as jaxpruner ignores it); ValueError
    when ``n > m``."""
    if self._too_many():
      raise ValueError(
        f'NByM(n={self.n}, m={self.m}): n must be an integer in [1, {self.m}] (at most m '
        'weights of a group of m can be kept).'
      )
    if sparsity is None:
      sparsity = 1.0 - self.n / self.m
    shape = jnp.shape(scores)
    axis = self.axis_for(len(shape))
    if shape and shape[axis] % self.m:
      raise ValueError(
        f'NByM(n={self.n}, m={self.m}, axis={self.axis}): axis {axis} of a leaf of shape '
        f'{shape} has {shape[axis]} weights, not a multiple of m={self.m}.'
      )
    return super().mask(scores, sparsity)


NbyM = NByM


@dataclasses.dataclass(frozen=True)
class Block(_st.Block):
  """prunax's block type, except on a leaf with more dimensions than ``block_shape``: the
  blocks tile its leading dimensions and span all the others (jaxpruner's rule: a
  ``(2, 2)`` block of a ``(4, 4, 8)`` leaf is prunax's ``Block((2, 2, 8))``; prunax's own
  ``Block((2, 2))`` blocks the trailing dimensions)."""

  def _for(self, shape) -> _st.Block:
    if len(shape) > len(self.block_shape):
      return _st.Block(
        self.block_shape + tuple(shape[len(self.block_shape) :]), self.use_avg_pooling
      )
    return _st.Block(self.block_shape, self.use_avg_pooling)

  def validate(self, shape, name):
    """prunax's check, of the block extended over the leaf's trailing dims."""
    self._for(tuple(shape)).validate(shape, name)

  def mask(self, scores, sparsity):
    """prunax's block mask, with the block extended over the leaf's trailing dims."""
    shape = jnp.shape(scores)
    if len(shape) > len(self.block_shape):
      full = _st.Block(
        self.block_shape + tuple(shape[len(self.block_shape) :]), self.use_avg_pooling
      )
      return full.mask(scores, sparsity)
    return super().mask(scores, sparsity)


def from_string(spec) -> SparsityType:
  """prunax's :func:`prunax.sparsity_types.from_string`, giving this module's ``NByM``
  (groups along the last axis) and ``Block`` (jaxpruner's rule on leaves with more dims)."""
  stype = _st.from_string(spec)
  if type(stype) is _st.NByM:
    return NByM(stype.n, stype.m, -1 if stype.axis is None else stype.axis)
  if type(stype) is _st.Block:
    return Block(stype.block_shape, stype.use_avg_pooling)
  return stype

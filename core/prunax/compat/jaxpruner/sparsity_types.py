"""jaxpruner's ``sparsity_types`` module: prunax's sparsity types, except that an ``NByM``
with ``n > m`` is an error when its masks are made (as in jaxpruner), not when it is
constructed (as in :class:`prunax.sparsity_types.NByM`)."""

from __future__ import annotations

import dataclasses

from prunax import sparsity_types as _st
from prunax.sparsity_types import Block
from prunax.sparsity_types import Channel
from prunax.sparsity_types import SparsityType
from prunax.sparsity_types import Unstructured
from prunax.sparsity_types import from_string

__all__ = ['Block', 'Channel', 'NByM', 'NbyM', 'SparsityType', 'Unstructured', 'from_string']


@dataclasses.dataclass(frozen=True)
class NByM(_st.NByM):
  """prunax's N:M type; ``n > m`` (no valid mask) raises ValueError in :meth:`mask`."""

  def _too_many(self) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m)) and (
      1 <= self.m < self.n
    )

  def __post_init__(self):
    if not self._too_many():
      super().__post_init__()

  def mask(self, scores, sparsity):
    """prunax's N:M mask; ValueError when ``n > m``."""
    if self._too_many():
      raise ValueError(
        f'NByM(n={self.n}, m={self.m}): n must be an integer in [1, {self.m}] (at most m '
        'weights of a group of m can be kept).'
      )
    return super().mask(scores, sparsity)


NbyM = NByM

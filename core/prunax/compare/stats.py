"""Paired statistics over seeds: differences with 95% t-intervals, and seeds needed.

Seed ``i`` gives every algorithm the same initialisation and batches, so the comparison of
two algorithms ``a`` and ``b`` is paired: ``d_i = m_a(i) - m_b(i)``. Over ``n`` seeds the
95% interval of the mean difference is ``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)``
(Student's t, ``sd`` with ``n - 1``); the difference is significant when the interval
excludes 0. The seeds needed to resolve an observed gap ``mean(d)`` with a two-sided paired
t-test at level 0.05 and power 0.8 are the smallest ``n >= 2`` with
``n >= ((t_{0.975, n-1} + t_{0.8, n-1}) · sd(d) / |mean(d)|)^2``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
POWER = 0.8
MAX_SEEDS = 10_000


def _t(q: float, df: int) -> float:
  from scipy import stats

  return float(stats.t.ppf(q, df))


def _z(q: float) -> float:
  from scipy import stats

  return float(stats.norm.ppf(q))


@dataclasses.dataclass(frozen=True)
class Paired:
  """A paired difference over seeds.

  Attributes:
    mean: mean of ``a - b`` over the seeds.
    low: lower end of the 95% t-interval (None with one seed).
    high: upper end (None with one seed).
    n: number of paired seeds.
    significant: whether the interval excludes 0 (False with one seed).
    seeds_needed: seeds for a paired t-test (0.05, power 0.8) to resolve ``mean``; None
      with one seed or a zero gap, ``MAX_SEEDS`` or more when beyond reach.
  """

  mean: float
  low: float | None
  high: float | None
  n: int
  significant: bool
  seeds_needed: int | None


def seeds_needed(gap: float, sd: float) -> int | None:
  """Smallest ``n >= 2`` with ``n >= ((t_{0.975,n-1} + t_{0.8,n-1}) sd / |gap|)^2``."""
  if gap == 0 or not math.isfinite(gap) or not math.isfinite(sd):
    return None
  if sd == 0:
    return 2
  # t quantiles exceed the normal ones, so the normal approximation is a lower bound on n.
  z = _z(1 - (1 - LEVEL) / 2) + _z(POWER)
  for n in range(max(2, math.floor((z * sd / abs(gap)) ** 2)), MAX_SEEDS):
    df = n - 1
    if n >= ((_t(1 - (1 - LEVEL) / 2, df) + _t(POWER, df)) * sd / abs(gap)) ** 2:
      return n
  return MAX_SEEDS


def best(means: Mapping[str, float], higher_is_better: bool = True) -> str | None:
  """The key of the best finite mean: the highest, or the lowest when ``higher_is_better``
  is False (a perplexity or a loss); None when no mean is finite."""
  finite = {k: float(m) for k, m in means.items() if m is not None and math.isfinite(m)}
  if not finite:
    return None
  return (max if higher_is_better else min)(finite, key=finite.get)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
  """The paired difference ``a - b`` (same seeds, same order) with its 95% t-interval."""
  if len(a) != len(b) or not a:
    raise ValueError(
      f'paired needs two equally long, non-empty samples, got {len(a)} and {len(b)} values.'
    )
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n, mean = len(d), float(d.mean())
  if n < 2:
    return Paired(mean, None, None, n, False, None)
  sd = float(d.std(ddof=1))
  half = _t(1 - (1 - LEVEL) / 2, n - 1) * sd / math.sqrt(n)
  low, high = mean - half, mean + half
  return Paired(mean, low, high, n, bool(low > 0 or high < 0), seeds_needed(mean, sd))

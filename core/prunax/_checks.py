"""Checks of constructor arguments: each returns the value as a plain Python type or raises.

A bad value raises ``ValueError`` (as ``float('x')`` does, and as configs expect: a wrong
type in a config is a wrong value) naming the argument, the value and what would be valid.
Bools are not numbers, strings are not numbers, and a number must be finite. Also
:func:`accepts_keyword`, for optional arguments of overridable methods.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import numpy as np


def _is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def _bound(x) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
  low = None if low is None else _bound(low)
  high = None if high is None else _bound(high)
  if low is not None and high is not None:
    return f' in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f' {">" if low_open else ">="} {low}'
  if high is not None:
    return f' {"<" if high_open else "<="} {high}'
  return ''


def number(
  value: Any,
  name: str,
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> float:
  """``value`` as a float: a finite real number (not a bool or a string) within the bounds.

  Args:
    value: the value to check.
    name: the argument's name, for the message.
    low: lower bound (None: unbounded), included unless ``low_open``.
    high: upper bound (None: unbounded), included unless ``high_open``.
    low_open: exclude ``low``.
    high_open: exclude ``high``.

  Returns:
    ``float(value)``.

  Raises:
    ValueError: ``value`` is not a real number, or is NaN, infinite or out of range.
  """
  bounds = _range_text(low, high, low_open, high_open)
  valid = f'a finite number{bounds}'
  scalar = np.ndim(value) == 0 and np.issubdtype(getattr(value, 'dtype', np.object_), np.number)
  if _is_bool(value) or not (isinstance(value, numbers.Real) or scalar) or np.iscomplexobj(value):
    raise ValueError(f'{name} must be {valid}, got {value!r} of type {type(value).__name__}.')
  result = float(value)
  if not math.isfinite(result):
    raise ValueError(f'{name} must be {valid}, got {value!r}.')
  if (low is not None and (result <= low if low_open else result < low)) or (
    high is not None and (result >= high if high_open else result > high)
  ):
    raise ValueError(f'{name} must be{bounds}, got {value!r}.')
  return result


def integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
  """``value`` as an int: an integer (not a bool, a float or a string) in ``[low, high]``.

  Raises:
    ValueError: ``value`` is not an integer, or is out of range.
  """
  valid = f'an integer{_range_text(low, high, False, False)}'
  if _is_bool(value) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be {valid}, got {value!r} of type {type(value).__name__}.')
  result = int(value)
  if (low is not None and result < low) or (high is not None and result > high):
    raise ValueError(f'{name} must be {valid}, got {value!r}.')
  return result


def boolean(value: Any, name: str) -> bool:
  """``value`` as a bool; anything but ``True``/``False`` (or numpy bools) is a ValueError."""
  if not _is_bool(value):
    raise ValueError(f'{name} must be True or False, got {value!r} of type {type(value).__name__}.')
  return bool(value)


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
  """``value`` if it is one of the strings ``options``, else a ValueError listing them."""
  if not isinstance(value, str) or value not in options:
    raise ValueError(f'{name} must be one of {list(options)}, got {value!r}.')
  return value


def assign(instance: Any, **values: Any) -> None:
  """Sets checked field values on a frozen dataclass ``instance`` (in ``__post_init__``)."""
  for field, value in values.items():
    object.__setattr__(instance, field, value)


def accepts_keyword(fn: Any, name: str) -> bool:
  """Whether ``fn`` takes the keyword argument ``name`` (or any keyword, ``**kwargs``), so
  an optional argument added to an overridable method reaches overrides written before it."""
  params = inspect.signature(fn).parameters.values()
  return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

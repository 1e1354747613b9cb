"""Shared fixtures of the core tests (the helpers they use live in ``helpers.py``)."""

import pytest

from prunax import selection
from tests.core.helpers import make_batch
from tests.core.helpers import mlp_params


@pytest.fixture
def params():
  return mlp_params()


@pytest.fixture
def batch():
  return make_batch()


@pytest.fixture
def search_path(monkeypatch):
  """Every selection made by the search loops, however small its arrays (arrays of at
  most ``selection._SORT_AT_MOST`` elements are sorted otherwise)."""
  monkeypatch.setattr(selection, '_SORT_AT_MOST', 0)


@pytest.fixture(params=['search', 'sort'])
def selection_path(request, monkeypatch):
  """Runs a test with every selection made by the search loops, then by sorting."""
  monkeypatch.setattr(selection, '_SORT_AT_MOST', 0 if request.param == 'search' else 2**31)
  return request.param

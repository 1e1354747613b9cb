"""Shared fixtures of the core tests (the helpers they use live in ``helpers.py``)."""

import pytest

from tests.core.helpers import make_batch
from tests.core.helpers import mlp_params


@pytest.fixture
def params():
  return mlp_params()


@pytest.fixture
def batch():
  return make_batch()

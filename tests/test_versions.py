"""One version: the adapters are released with the core and say so."""

import pathlib

import pytest

import prunax

tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from 3.11')

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_adapters_carry_the_core_version():
  core = tomllib.loads((ROOT / 'core' / 'pyproject.toml').read_text())['project']
  assert core['dynamic'] == ['version']  # read from prunax.__version__
  adapters = sorted((ROOT / 'integrations').glob('*/pyproject.toml'))
  assert len(adapters) == 4
  for path in adapters:
    project = tomllib.loads(path.read_text())['project']
    assert project['version'] == prunax.__version__, path

"""Compatibility with other pruning libraries.

``prunax.compat.jaxpruner`` holds jaxpruner's forms that would make prunax's own API
ambiguous (its summary format, its top-k functions). Everything else of jaxpruner's public
API is accepted by prunax itself, so ``import prunax as jaxpruner`` runs jaxpruner programs;
``MIGRATION.md`` lists what differs.
"""

import importlib


def __getattr__(name):
  if name in ('jaxpruner', 'updater_args'):
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

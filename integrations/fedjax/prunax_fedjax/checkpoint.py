"""Saving and restoring a FedJAX server state (the prunax state included) between rounds.

FedJAX's ``fedjax.serialization.save_state`` needs TensorFlow for file access. These two
functions write the state's leaves with FedJAX's own msgpack serializer and read them back
into the structure of a template state (``algorithm.init(params)`` of the same model and
algorithm), so a relaunched process continues with the rounds an uninterrupted one would
run. Dtypes are kept: the prunax round counter and RNG key stay integer.
"""

from __future__ import annotations

import os
from typing import Any

import fedjax
import jax
import numpy as np

PyTree = Any


def save_server_state(path: str | os.PathLike, state: PyTree) -> None:
  """Writes the leaves of a server state to ``path`` (msgpack; the file is replaced).

  Args:
    path: the file to write; written to ``path + '.tmp'`` first, then renamed, so an
      interrupted save leaves the previous checkpoint intact.
    state: the server state, e.g. the first value returned by ``algorithm.apply``.
  """
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]
  tmp = os.fspath(path) + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(fedjax.serialization.msgpack_serialize(leaves))
  os.replace(tmp, path)


def restore_server_state(path: str | os.PathLike, template: PyTree) -> PyTree:
  """Reads a server state written by :func:`save_server_state` into ``template``'s structure.

  Args:
    path: the file written by :func:`save_server_state`.
    template: a server state of the same algorithm and model, e.g. ``algorithm.init(params)``
      (its values are not used).

  Returns:
    The restored server state (numpy leaves with the saved dtypes).

  Raises:
    ValueError: if the file does not hold a state of the template's structure (a different
      number of leaves, or a leaf of another shape or dtype), naming the first mismatch.
  """
  with open(path, 'rb') as f:
    leaves = fedjax.serialization.msgpack_deserialize(f.read())
  paths_and_expected, treedef = jax.tree_util.tree_flatten_with_path(template)
  if len(leaves) != len(paths_and_expected):
    raise ValueError(
      f'{os.fspath(path)!r} holds {len(leaves)} arrays but the template server '
      f'state has {len(paths_and_expected)} leaves: it was saved for another '
      'model, algorithm or pruner.'
    )
  for (key, expected), leaf in zip(paths_and_expected, leaves, strict=True):
    expected = np.asarray(jax.device_get(expected))
    if leaf.shape != expected.shape or leaf.dtype != expected.dtype:
      raise ValueError(
        f'{os.fspath(path)!r}: leaf {jax.tree_util.keystr(key)} was saved as '
        f'{leaf.dtype}{list(leaf.shape)} but the template has '
        f'{expected.dtype}{list(expected.shape)}.'
      )
  return jax.tree_util.tree_unflatten(treedef, leaves)

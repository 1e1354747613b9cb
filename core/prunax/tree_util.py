"""Tree utilities shared by the engine, the algorithms and the adapters.

A tree of masks has the params' structure, with ``None`` (in memory) or ``optax.MaskedNode``
(in a stored optimizer state, which every checkpointer saves) at the leaves that are not
pruned. These helpers map over such trees and name their leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any


def is_none(x: Any) -> bool:
  """Whether ``x`` is None (an ``is_leaf`` that keeps None leaves in a map)."""
  return x is None


def is_unpruned(x: Any) -> bool:
  """Whether a leaf of a masks tree marks a leaf that is not pruned (None or MaskedNode)."""
  return x is None or isinstance(x, optax.MaskedNode)


def map_masked(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
  """``fn(mask, *leaves)`` on pruned leaves; elsewhere the leaf of ``trees[0]`` passes through.

  Args:
    fn: function of a mask leaf and the matching leaves of ``trees``.
    masks: tree whose leaves are masks or None.
    *trees: trees with the structure of params.

  Returns:
    A tree like ``trees[0]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> masks = {'w': jnp.array([True, False]), 'b': None}
    >>> out = map_masked(lambda m, p: p * m, masks, {'w': jnp.ones(2), 'b': jnp.ones(2)})
    >>> out['w'].tolist(), out['b'].tolist()
    ([1.0, 0.0], [1.0, 1.0])
  """

  def apply(m, *xs):
    if m is None:
      return xs[0] if xs else None
    return fn(m, *xs)

  return jax.tree.map(apply, masks, *trees, is_leaf=is_none)


def apply_to_pruned(fn: Callable[..., list], marks: PyTree, *trees: PyTree) -> PyTree:
  """``fn`` on the leaves of ``trees`` where ``marks`` is not None, all at once.

  Args:
    fn: called as ``fn(list_0, list_1, ...)`` with, for each tree, the list of its leaves at
      the marked places (in pytree order); returns one result per marked leaf.
    marks: a tree like the params whose None leaves are left out (masks, sparsities).
    *trees: trees like ``marks`` (their leaves may be anything, ``Lazy`` scores included).

  Returns:
    A tree like ``marks``: ``fn``'s results at the marked leaves, None elsewhere.

  Examples:
    >>> out = apply_to_pruned(
    ...   lambda xs: [x * 10 for x in xs], {'a': 1, 'b': None, 'c': 2}, {'a': 1, 'b': 5, 'c': 2}
    ... )
    >>> out
    {'a': 10, 'b': None, 'c': 20}
  """
  flat, treedef = jax.tree.flatten(marks, is_leaf=is_none)
  chosen = [i for i, m in enumerate(flat) if m is not None]
  lists = [[leaves[i] for i in chosen] for leaves in (treedef.flatten_up_to(t) for t in trees)]
  out = [None] * len(flat)
  for i, result in zip(chosen, fn(*lists), strict=True):
    out[i] = result
  return treedef.unflatten(out)


def pruned_only(masks: PyTree, tree: PyTree) -> PyTree:
  """``tree`` with None at the leaves whose mask is None (those that are not pruned)."""
  return jax.tree.map(lambda m, x: None if m is None else x, masks, tree, is_leaf=is_none)


def to_stored(tree: PyTree) -> PyTree:
  """``tree`` with its None leaves (or itself, if None) as ``optax.MaskedNode()``: the form
  kept in an optimizer state, which checkpointers save and restore."""
  if tree is None:
    return optax.MaskedNode()
  return jax.tree.map(lambda x: optax.MaskedNode() if x is None else x, tree, is_leaf=is_none)


def from_stored(tree: PyTree) -> PyTree:
  """Inverse of :func:`to_stored`: ``MaskedNode`` leaves (or the whole tree) as None."""
  if isinstance(tree, optax.MaskedNode):
    return None
  return jax.tree.map(lambda x: None if is_unpruned(x) else x, tree, is_leaf=is_unpruned)


def path_name(path) -> str:
  """``'/'``-joined name of a ``jax.tree_util`` key path (dict keys, attributes, indices).

  A trailing ``.value`` attribute (the array inside a flax box: linen ``Partitioned``,
  nnx ``Variable``) is not part of the name, so boxed and unboxed params share names.
  """
  parts = []
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def named_leaves(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
  """Leaves of ``tree`` with their path names (:func:`path_name`), in pytree order.

  Examples:
    >>> named_leaves({'dense': {'kernel': 1, 'bias': 2}})
    [('dense/bias', 2), ('dense/kernel', 1)]
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_name(path), leaf) for path, leaf in flat]


def named_tree(tree: PyTree, fn: Callable[[str, Any], Any], is_leaf=None) -> PyTree:
  """A tree like ``tree`` of ``fn(name, leaf)`` for every leaf, with its path name."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree, is_leaf=is_leaf)

"""Random masks with an exact count and no selection: a keyed permutation of positions.

A uniformly random mask that keeps exactly ``k`` of a leaf's ``n`` weights keeps the
weights at the positions ``i`` with ``perm(i) < k``, for ``perm`` a random permutation of
``[0, n)``. :func:`permute` evaluates a keyed pseudo-random permutation elementwise (the
swap-or-not shuffle of Hoang, Morris and Rogaway, "An Enciphering Scheme Based on a Card
Shuffle", CRYPTO 2012, which works on any ``n``, not only powers of two), so a random
initial mask (sparse training: SET, RigL, static random masks) is elementwise work per
leaf shape: a loop of one round each (unrolled for large models, see :func:`permute`).
Drawing it as the top ``k`` of random scores instead needs a
selection (a counting loop at init), whose compile time was as long as the train step's:
4-6 s at init for 64 layers of 256 x 256 on a 2-core CPU, against 0.1 s for adam's init.

Each round ``r`` pairs every position ``x`` with ``K_r - x (mod n)`` and swaps the pair
when a keyed hash of the pair's larger member has its top bit set; a round is a bijection
(both members of a pair agree), so the composition of :data:`ROUNDS` rounds is one.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunax import selection

# Swap-or-not rounds. Each round lets every position move with probability 1/2 to a
# position chosen by a fresh key; the tests check that the kept positions of many keys
# are as uniform and as independent as exact uniform draws (tests/core/test_random_masks.py).
ROUNDS = 24

# The largest number of positions a permutation takes: ``K + n - x`` stays in uint32 and
# the count in int32. A larger layer (an 8 GB float32 one) is drawn from random scores.
MAX_POSITIONS = 2**31 - 1

# The most weights whose random masks one init draws with its rounds in a loop (see
# :func:`permute`): the loop keeps every position between rounds, 4 bytes a weight, so
# beyond 2**24 weights (64 MB of positions) the rounds are unrolled and store nothing.
LOOP_MAX_POSITIONS = 2**24


def round_keys(key_data: jax.Array, rounds: int = ROUNDS) -> jax.Array:
  """uint32 ``key_data.shape[:-1] + (rounds, 2)``: the offset and hash key of each round,
  derived from key words (``(..., 2)``, e.g. one key per leaf) by
  :func:`prunax.selection.fold_key`."""
  key_data = jnp.asarray(key_data, jnp.uint32)
  return selection.fold_key(key_data[..., None, :], jnp.arange(rounds, dtype=jnp.uint32))


def permute(index: jax.Array, n: int, keys: jax.Array, unroll: bool = False) -> jax.Array:
  """A keyed pseudo-random permutation of ``[0, n)``, applied to every element of ``index``.

  The rounds run in a loop, so XLA compiles one round: unrolled, the 24 rounds made a
  kernel of about 600 instructions per group of alike leaves, and a SET init of 4 layers
  of 256 x 256 compiled in 0.6-0.9 s, of 64 layers in 1.6-2.0 s (looped: 0.55-0.6 s and
  0.8-0.9 s; adam's own init 0.1 s). The loop keeps ``index``'s positions between rounds
  (4 bytes an element); with ``unroll``, XLA fuses the rounds into what reads the result
  and stores nothing (:data:`LOOP_MAX_POSITIONS`). Both give the same permutation.

  Args:
    index: uint32 positions in ``[0, n)``.
    n: the number of positions (``1 <= n <= MAX_POSITIONS``).
    keys: uint32 ``(rounds, 2)`` from :func:`round_keys`, or ``(rounds, 2) + s`` with
      ``s`` broadcasting against ``index`` (a permutation per layer of a stacked leaf).
    unroll: unroll the rounds (no stored positions, a larger kernel to compile).

  Returns:
    uint32 of ``index``'s shape: a bijection of ``[0, n)`` for every key.
  """
  if not 1 <= n <= MAX_POSITIONS:
    raise ValueError(f'permute: n={n} positions; valid: 1 <= n <= {MAX_POSITIONS}.')
  x = jnp.asarray(index, jnp.uint32)
  if n == 1:
    # The only permutation. (Compiled with traced keys, the rounds modulo 1 sent XLA's
    # algebraic simplifier into a loop and the compile failed.)
    return x
  shape, ndim = x.shape, x.ndim
  keys = jnp.asarray(keys, jnp.uint32)
  dims = tuple(range(ndim - (keys.ndim - 2), ndim))  # the keys' trailing axes in x's
  size = np.uint32(n)
  offsets = keys[:, 0] % size

  def one_round(r, x):
    offset = jax.lax.broadcast_in_dim(offsets[r], shape, dims)
    hash_key = jax.lax.broadcast_in_dim(keys[r, 1], shape, dims)
    partner = offset + (size - x)  # (offset - x) mod n, in [1, 2n)
    partner = jnp.where(partner >= size, partner - size, partner)
    swap = selection.mix32(jnp.maximum(x, partner) ^ hash_key) >= np.uint32(2**31)
    return jnp.where(swap, partner, x)

  if unroll:
    for r in range(keys.shape[0]):
      x = one_round(r, x)
    return x
  return jax.lax.fori_loop(0, keys.shape[0], one_round, x)


def keep_mask(
  shape: tuple[int, ...],
  k: Any,
  keys: jax.Array,
  layer_axis: int | None = None,
  unroll: bool = False,
):
  """Bool mask of ``shape`` keeping exactly ``k`` random positions (per layer along
  ``layer_axis``, each layer permuted by its own keys).

  Args:
    shape: the leaf's shape.
    k: positions kept (per layer); an int or a traced int scalar, clipped to
      ``[0, positions]``.
    keys: uint32 ``(rounds, 2)`` (:func:`round_keys` of the leaf's key); with
      ``layer_axis``, ``(layers, rounds, 2)``, one row per layer.
    layer_axis: the layer axis of a stacked leaf, or None.
    unroll: unroll the permutation's rounds (:func:`permute`).

  Returns:
    A bool array of ``shape``.
  """
  shape = tuple(shape)
  if layer_axis is None:
    inner, per_round = shape, keys
  else:
    inner = shape[:layer_axis] + (1,) + shape[layer_axis + 1 :]
    # (rounds, 2, layers) broadcast along the layer axis of the leaf.
    bshape = [1] * len(shape)
    bshape[layer_axis] = shape[layer_axis]
    per_round = jnp.moveaxis(keys, 0, -1).reshape(keys.shape[1:3] + tuple(bshape))
  n = math.prod(inner)
  # Row-major positions within a layer, the same in every layer.
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint32).reshape(inner), shape)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, n).astype(jnp.uint32)
  return permute(index, n, per_round, unroll) < k


def leaf_masks(
  shapes: list[tuple[int, ...]], ks: list[Any], key: jax.Array, layer_axes: list[int | None]
) -> list[selection.Lazy | None]:
  """Random exact masks of many leaves, as :class:`prunax.selection.Lazy` values: leaf
  ``i`` keeps ``ks[i]`` positions (per layer along ``layer_axes[i]``), permuted by ``key``
  (uint32 words, or a threefry key) folded with ``i``; None where ``ks[i]`` is None (a
  leaf that is not pruned).

  Lazy, so that where they are stored (``prunax.masks.pack_masks``) or materialised
  (``prunax.selection.map_alike``) alike leaves are drawn together: one ``vmap`` over their
  keys and counts, the permutation's rounds traced and compiled once per group of leaves
  of one shape rather than once per leaf. (Drawn as arrays one leaf at a time, XLA fused
  each leaf's rounds into the kernel that packs it: one 0.2 s LLVM compile per leaf.)
  The rounds run in a loop (:func:`permute`) when the pruned leaves hold at most
  :data:`LOOP_MAX_POSITIONS` weights in all, else unrolled.
  """
  if not shapes:
    return []
  drawn = sum(math.prod(shape) for shape, k in zip(shapes, ks, strict=True) if k is not None)
  unroll = drawn > LOOP_MAX_POSITIONS
  leaf_keys = round_keys(selection.fold_key(key, jnp.arange(len(shapes), dtype=jnp.uint32)))
  keys = selection.Shared(leaf_keys)
  return [
    None
    if k is None
    else selection.Lazy(
      functools.partial(_keep_at, tuple(shape), axis, unroll),
      keys,
      np.int32(i),
      jnp.asarray(k, jnp.int32),
      shape=tuple(shape),
    )
    for i, (shape, k, axis) in enumerate(zip(shapes, ks, layer_axes, strict=True))
  ]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _keep_at(shape, axis, unroll, leaf_keys, i, k):
  """:func:`keep_mask` of leaf ``i`` (its round keys: row ``i`` of ``leaf_keys``).

  Jitted: traced once per shape, and its vmap (a group of alike leaves) batched once;
  tracing the rounds under ``vmap`` for every group took most of an init's trace time
  (1.0 s of 1.3 s at 64 layers of 256 x 256)."""
  keys = leaf_keys[i]  # i is traced here (an argument of the jit), so no constant index
  if axis is not None:
    layers = np.arange(shape[axis], dtype=np.uint32)
    keys = selection.fold_key(keys, layers[:, None])  # (layers, rounds, 2)
  return keep_mask(shape, k, keys, axis, unroll)

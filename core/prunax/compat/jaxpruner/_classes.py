"""jaxpruner's updater classes: prunax's algorithms with jaxpruner's defaults.

:func:`compat_class` derives, from a prunax updater class, a class of the same name whose
defaults are jaxpruner's: target sparsity 0 (``partial(uniform, sparsity=0.0)``), masks
stored unpacked as uint8, ``NoUpdateSchedule``, ``rng_seed=PRNGKey(8)``. Its instances
accept attribute assignment as jaxpruner's mutable dataclasses do: assigning a constructor
field rebuilds the updater with that field (``dataclasses.replace``, so the value is
checked and resolved as in the constructor); any other attribute (a method replaced by a
mock, say) is set on the instance. They hash by identity and by the number of
assignments, so a ``jax.jit`` that takes one as a static argument retraces after an
assignment.

jaxpruner's users write their own algorithms as ``@dataclasses.dataclass`` (not frozen)
subclasses of its classes, which Python refuses on a frozen base. So a class derived
from a compat class is rebased, as it is created (``__init_subclass__``, before its
decorator runs), onto a plain class, and declares the compat class's fields in its own
body (:func:`_declare_fields`), so that its decorator, frozen or not, makes them its
fields; its instances are of its *twin* (:func:`twin_class`), the class
derived from both the user's class and the compat class, made at the first
instantiation. The user's methods come first, ``super()`` reaches the compat class's,
``isinstance`` holds for both, and attributes assigned while the instance is
constructed (in a ``__post_init__``, as jaxpruner's own extensions do) are set as they
are; afterwards assignment works as above. A class that overrides ``update_state`` or
``apply_masks`` is wrapped in jaxpruner's order of calls
(:func:`wrapped_calling_update_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunax import base_updater
from prunax import engines
from prunax import selection
from prunax import sparsity_distributions
from prunax import sparsity_types
from prunax import tree_util
from prunax.compat.jaxpruner import sparsity_schedules
from prunax.compat.jaxpruner import sparsity_types as compat_types

# jaxpruner's BaseUpdater defaults (its field values, in prunax's field names).
_DEFAULT_DIST = functools.partial(sparsity_distributions.uniform, sparsity=0.0)
JAXPRUNER_DEFAULTS: dict[str, Any] = {
  'sparsity_distribution_fn': _DEFAULT_DIST,
  'scheduler': sparsity_schedules.NoUpdateSchedule(),
  'packed_masks': False,
}
# jaxpruner's default key when no rng_seed is given (``jax.random.PRNGKey(8)``).
DEFAULT_RNG_SEED = 8


def _setattr(self, name: str, value: Any) -> None:
  """jaxpruner-style ``updater.name = value`` (see the module docstring)."""
  init_fields = {f.name for f in dataclasses.fields(self) if f.init}
  if name in init_fields:
    new = dataclasses.replace(self, **{name: value})
    for f in dataclasses.fields(new):
      object.__setattr__(self, f.name, getattr(new, f.name))
  else:
    object.__setattr__(self, name, value)
  object.__setattr__(self, '_assignments', getattr(self, '_assignments', 0) + 1)


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
  return dataclasses.field(
    default=f.default,
    default_factory=f.default_factory,
    init=f.init,
    repr=f.repr,
    hash=f.hash,
    compare=f.compare,
    metadata=f.metadata,
    kw_only=f.kw_only,
  )


_PLAIN_BASES: dict[type, type] = {}
_TWINS: dict[type, type] = {}


def _init_subclass(cls: type, **kwargs: Any) -> None:
  """A class derived from a compat class: rebased onto :func:`_plain_base`, the compat
  class's fields declared in its own body (see the module docstring)."""
  if _is_twin_class(cls):
    return
  if len(cls.__bases__) != 1:
    raise TypeError(
      f'{cls.__name__}: a jaxpruner-style algorithm derives from one prunax.compat.jaxpruner '
      f'class, got the bases {cls.__bases__}.'
    )
  if kwargs:
    raise TypeError(f'{cls.__name__}: unexpected class keywords {sorted(kwargs)}.')
  (base,) = cls.__bases__
  cls.__bases__ = (_plain_base(base),)
  _declare_fields(cls, base)


def _plain_init_subclass(cls: type, **kwargs: Any) -> None:
  """A class derived from a user's class: it declares the compat class's fields too
  where no dataclass between them holds them (an undecorated user class)."""
  if _is_twin_class(cls):
    return
  if kwargs:
    raise TypeError(f'{cls.__name__}: unexpected class keywords {sorted(kwargs)}.')
  user_classes = cls.__mro__[1 : cls.__mro__.index(_plain_base(cls._prunax_compat_base))]
  if not any('__dataclass_fields__' in c.__dict__ for c in user_classes):
    _declare_fields(cls, cls._prunax_compat_base)


def _declare_fields(cls: type, base: type) -> None:
  """Declares the fields of ``base`` in ``cls``'s body (annotations and defaults), first
  and in order, as if ``cls`` derived from a plain dataclass with them: a decorator on
  ``cls`` then makes them its own fields, frozen or not; ``cls``'s own declarations of
  those names win."""
  own = dict(cls.__dict__.get('__annotations__', {}))
  annotations = {}
  for f in dataclasses.fields(base):
    annotations[f.name] = own.pop(f.name, f.type)
    if f.name not in cls.__dict__:
      setattr(cls, f.name, _copy_field(f))
  annotations.update(own)
  cls.__annotations__ = annotations


def _plain_base(base: type) -> type:
  """A plain class (no dataclass, no fields) standing for the compat class ``base`` in
  its subclasses' bases; their instances are made of :func:`twin_class`."""
  if base not in _PLAIN_BASES:
    holder: list[type] = []

    def post_init(self) -> None:
      super(holder[0], self).__post_init__()

    namespace = {
      '__new__': _new_twin,
      '__post_init__': post_init,
      '__init_subclass__': classmethod(_plain_init_subclass),
      '__module__': base.__module__,
      '__qualname__': base.__qualname__,
      '__doc__': base.__doc__,
      '_prunax_compat_base': base,
    }
    holder.append(type(base.__name__, (), namespace))
    _PLAIN_BASES[base] = holder[0]
  return _PLAIN_BASES[base]


def _new_twin(cls: type, *args: Any, **kwargs: Any) -> Any:
  del args, kwargs
  return object.__new__(cls if _is_twin_class(cls) else twin_class(cls))


def twin_class(cls: type) -> type:
  """The class whose instances a class derived from a compat class makes: derived from
  ``cls`` and its compat class (see the module docstring); ``cls`` itself otherwise."""
  base = getattr(cls, '_prunax_compat_base', None)
  if base is None or _is_twin_class(cls):
    return cls
  if cls not in _TWINS:
    holder: list[type] = []

    def init(self, *args: Any, **kwargs: Any) -> None:
      object.__setattr__(self, '_prunax_constructing', True)
      try:
        super(holder[0], self).__init__(*args, **kwargs)
      finally:
        object.__delattr__(self, '_prunax_constructing')

    namespace = {
      '__init__': init,
      '__setattr__': _twin_setattr,
      '__hash__': _hash,
      '__eq__': _eq,
      '__module__': cls.__module__,
      '__qualname__': cls.__qualname__,
      '__doc__': cls.__doc__,
      '_prunax_twin': True,
    }
    holder.append(type(cls.__name__, (cls, base), namespace))
    _TWINS[cls] = holder[0]
  return _TWINS[cls]


def is_twin(updater: Any) -> bool:
  """Whether ``updater`` is an instance of a user's class derived from a compat class."""
  return _is_twin_class(type(updater))


def _is_twin_class(cls: type) -> bool:
  return '_prunax_twin' in cls.__dict__


# jaxpruner's methods that its wrapped transformation calls and prunax's does not (it
# updates masks through calculate_scores and compute_masks, inside the step); a class
# that overrides update_state or apply_masks gets jaxpruner's order of calls
# (wrapped_calling_update_state), the other two would not be called by either.
_NOT_CALLED_BY_WRAP_OPTAX = ('create_masks', 'get_initial_masks')
_CALLED_BY_JAXPRUNERS_WRAP_OPTAX = ('update_state', 'apply_masks')


def wrapped_calling_update_state(updater: Any, inner: Any) -> Any:
  """jaxpruner's wrapped transformation, for a user's class that overrides
  ``update_state`` or ``apply_masks``: on the schedule's mask-update steps the
  updater's ``update_state`` (the user's, its extra ``update`` arguments passed on),
  then ``inner`` on the gradients (masked by ``apply_masks`` with
  ``is_sparse_gradients``; not run on mask-update steps with ``skip_gradients``). Its
  updates also move the weights the masks drop to 0, so the params after
  ``optax.apply_updates`` are as sparse as the masks (jaxpruner needs
  ``post_gradient_update`` for that; prunax's wrapped transformations need nothing)."""

  def init_fn(params):
    return updater.init_state(params, inner.init(params))

  def update_fn(grads, state, params=None, **kwargs):
    if params is None:
      raise ValueError(f'{type(updater).__name__}: the wrapped update needs params.')
    is_update = jnp.asarray(updater.scheduler.is_update_step(state.count), bool)
    new_state = jax.lax.cond(
      is_update, lambda s: updater.update_state(s, params, grads, **kwargs), lambda s: s, state
    )
    if updater.is_sparse_gradients:
      grads = updater.apply_masks(grads, tree_util.from_stored(new_state.masks), None)
    updates, inner_state = jax.lax.cond(
      is_update & bool(updater.skip_gradients),
      lambda g, s: (jax.tree.map(jnp.zeros_like, g), s),
      lambda g, s: inner.update(g, s, params),
      grads,
      new_state.inner_state,
    )
    masks = base_updater.unpack_masks(new_state.masks, params)
    updates = jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
      masks,
      updates,
      params,
      is_leaf=lambda x: x is None,
    )
    return updates, new_state._replace(inner_state=inner_state, count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _twin_setattr(self, name: str, value: Any) -> None:
  if '_prunax_constructing' in self.__dict__:
    object.__setattr__(self, name, value)
  else:
    _setattr(self, name, value)


def _hash(self) -> int:
  return hash((id(self), getattr(self, '_assignments', 0)))


def _eq(self, other: Any) -> bool:
  return self is other


def nm_erk_targets(
  params: Any,
  sparsity: float,
  *,
  erk_sparsity: float,
  nm_sparsity: float,
  layer_axes: Any = None,
  **erk_kwargs: Any,
) -> Any:
  """jaxpruner's N:M targets under ERK: a leaf that ERK at ``erk_sparsity`` keeps dense (0)
  stays dense, every other ERK leaf takes N:M's own ``nm_sparsity`` (jaxpruner computes
  N:M masks only where the target is non-zero). ``layer_axes``: as :func:`erk`'s."""
  del sparsity  # the updater's own target is N:M's (nm_sparsity)
  targets = sparsity_distributions.erk(params, erk_sparsity, layer_axes=layer_axes, **erk_kwargs)
  return jax.tree.map(
    lambda s: None if s is None else (0.0 if s == 0 else nm_sparsity),
    targets,
    is_leaf=lambda x: x is None,
  )


def _erk_parts(dist) -> tuple[float | None, dict[str, Any]] | None:
  """(bound sparsity, other keywords) of an ERK distribution; None if ``dist`` is not ERK."""
  if isinstance(dist, str):
    return (None, {}) if dist.lower() == 'erk' else None
  if isinstance(dist, sparsity_distributions.Partial):
    if dist.fn is not sparsity_distributions.erk:
      return None
    kw = {k: dict(v) if k == 'custom_sparsity_map' else v for k, v in dist.kwargs}
  elif isinstance(dist, functools.partial):
    if getattr(dist.func, '__wrapped__', dist.func) is not sparsity_distributions.erk:
      return None
    kw = dict(dist.keywords)
  elif getattr(dist, '__wrapped__', dist) is sparsity_distributions.erk:
    kw = {}
  else:
    return None
  return kw.pop('sparsity', None), kw


def _jaxpruner_nm_target(updater) -> None:
  """With N:M structure, jaxpruner ignores the target sparsity (any non-zero target means
  N:M's own, ``1 - n/m``); so does the compat updater. Under ERK, the leaves ERK keeps
  dense stay dense (:func:`nm_erk_targets`)."""
  try:
    stype = sparsity_types.from_string(updater.sparsity_type)
  except (ValueError, TypeError):
    return  # prunax's own check reports it.
  if isinstance(updater.sparsity_type, str):
    object.__setattr__(updater, 'sparsity_type', compat_types.from_string(updater.sparsity_type))
  if not isinstance(stype, sparsity_types.NByM):
    return
  own = stype.sparsity
  erk = _erk_parts(updater.sparsity_distribution_fn)
  if erk is not None:
    bound, kw = erk
    target = bound if bound is not None else updater.sparsity
    if target:
      object.__setattr__(
        updater,
        'sparsity_distribution_fn',
        sparsity_distributions.Partial(nm_erk_targets, erk_sparsity=target, nm_sparsity=own, **kw),
      )
      object.__setattr__(updater, 'sparsity', own)
      return
    # No or a zero target: uniform with the same arguments (all dense at 0).
    if bound is not None:
      kw['sparsity'] = bound
    object.__setattr__(
      updater,
      'sparsity_distribution_fn',
      functools.partial(sparsity_distributions.uniform, **kw)
      if kw
      else sparsity_distributions.uniform,
    )
  if updater.sparsity:
    object.__setattr__(updater, 'sparsity', own)
  dist = updater.sparsity_distribution_fn
  if isinstance(dist, functools.partial) and dist.keywords.get('sparsity'):
    object.__setattr__(
      updater,
      'sparsity_distribution_fn',
      functools.partial(dist.func, *dist.args, **{**dist.keywords, 'sparsity': own}),
    )


def compat_class(base: type, module: str, **defaults: Any) -> type:
  """A subclass of the prunax updater ``base`` with jaxpruner's defaults.

  Args:
    base: a prunax updater class (a frozen dataclass).
    module: the ``__module__`` of the new class.
    **defaults: field defaults (besides :data:`JAXPRUNER_DEFAULTS`); a name that is not
      a field of ``base`` adds a keyword-only field (jaxpruner-only arguments).

  Returns:
    The class, named as ``base``.
  """
  base_fields = {f.name: f for f in dataclasses.fields(base)}
  new_fields = []
  for name, value in {**JAXPRUNER_DEFAULTS, **defaults}.items():
    kw_only = base_fields[name].kw_only if name in base_fields else True
    new_fields.append((name, Any, dataclasses.field(default=value, kw_only=kw_only)))
  holder: list[type] = []

  def post_init(self) -> None:
    if self.rng_seed is None and self.seed == 0:
      object.__setattr__(self, 'rng_seed', jax.random.PRNGKey(DEFAULT_RNG_SEED))
    if self.sparsity is not None and self.sparsity_distribution_fn is _DEFAULT_DIST:
      # An explicit target replaces the default's bound 0.0 (uniform, as jaxpruner's
      # global pruners' own sparsity field does).
      object.__setattr__(self, 'sparsity_distribution_fn', sparsity_distributions.uniform)
    _jaxpruner_nm_target(self)
    if engines.trains_dense_weights(self) and self.skip_gradients is True:
      warnings.warn(
        f'{type(self).__name__}: skip_gradients=True is ignored; STE recomputes its masks '
        'at every step and has no mask-update steps to skip.',
        stacklevel=3,
      )
      object.__setattr__(self, 'skip_gradients', False)
    super(holder[0], self).__post_init__()
    if isinstance(self.rng_seed, tuple):
      # jaxpruner's attribute holds the key (a uint32 array), not prunax's hashable tuple.
      object.__setattr__(self, 'rng_seed', np.asarray(self.rng_seed, np.uint32))

  def calculate_scores(self, params, sparse_state=None, grads=None, **kwargs):
    scores = super(holder[0], self).calculate_scores(
      params, sparse_state=sparse_state, grads=grads, **kwargs
    )
    # jaxpruner's scores are arrays (prunax's built-ins may return lazy ones).
    return jax.tree.map(
      selection.materialize, scores, is_leaf=lambda x: isinstance(x, selection.Lazy)
    )

  def update_state(self, sparse_state, params, grads=None, **kwargs):
    new_state = super(holder[0], self).update_state(sparse_state, params, grads, **kwargs)
    return new_state._replace(
      inner_state=restart_grown(sparse_state.masks, new_state.masks, new_state.inner_state, params)
    )

  def wrap_optax(self, inner):
    def overridden(names):
      return [n for n in names if getattr(type(self), n) is not getattr(holder[0], n)]

    ignored = overridden(_NOT_CALLED_BY_WRAP_OPTAX)
    jaxpruners = overridden(_CALLED_BY_JAXPRUNERS_WRAP_OPTAX)
    if jaxpruners and engines.trains_dense_weights(self):
      ignored += jaxpruners  # a straight-through step has no mask-update steps
    if ignored:
      raise TypeError(
        f'{type(self).__name__} overrides {", ".join(ignored)}, which the wrapped '
        'transformation does not call (its mask updates run calculate_scores and '
        'compute_masks, or update_state and apply_masks where a class overrides those). '
        'Override calculate_scores (the scores masks keep), compute_masks (the new '
        'masks from the scores and the old masks) or update_state instead; the '
        'overridden methods run as written where a hand-written loop calls them.'
      )
    if jaxpruners:
      return wrapped_calling_update_state(self, inner)
    return super(holder[0], self).wrap_optax(inner)

  namespace = {
    'update_state': update_state,
    'wrap_optax': wrap_optax,
    '__init_subclass__': classmethod(_init_subclass),
    '__module__': module,
    '__post_init__': post_init,
    'calculate_scores': calculate_scores,
  }
  cls = dataclasses.make_dataclass(
    base.__name__, new_fields, bases=(base,), frozen=True, namespace=namespace
  )
  holder.append(cls)
  cls.__qualname__ = base.__name__
  cls.__doc__ = (
    f"prunax.{base.__name__} with jaxpruner's defaults and attribute assignment "
    f'(see {__name__}).\n\n{base.__doc__ or ""}'
  )
  cls.__setattr__ = _setattr
  cls.__hash__ = _hash
  cls.__eq__ = _eq
  return cls


def restart_grown(old_masks: Any, new_masks: Any, inner_state: Any, params: Any) -> Any:
  """``inner_state`` with the per-weight entries of grown weights (kept by ``new_masks``,
  not by ``old_masks``) set to 0, as jaxpruner's ``update_state`` does: every subtree of
  the state shaped like ``params`` (optimizer moments, traces) is reset there."""
  old = base_updater.unpack_masks(old_masks, params)
  new = base_updater.unpack_masks(new_masks, params)
  grown = jax.tree.map(
    lambda o, n: None if o is None or n is None else jnp.logical_and(n, jnp.logical_not(o)),
    old,
    new,
    is_leaf=lambda x: x is None,
  )
  treedef = jax.tree.structure(params)

  def like_params(x) -> bool:
    try:
      return jax.tree.structure(x) == treedef
    except Exception:
      return False

  def reset(sub):
    if not like_params(sub):
      return sub
    return jax.tree.map(
      lambda g, v: (
        v if g is None or jnp.shape(v) != jnp.shape(g) else jnp.where(g, jnp.zeros_like(v), v)
      ),
      grown,
      sub,
      is_leaf=lambda x: x is None,
    )

  return jax.tree.map(reset, inner_state, is_leaf=like_params)


def normalized_global_masks(updater, scores, sparsities, masks_from_scores):
  """jaxpruner's global selection: each leaf's scores divided by their L2 norm plus
  ``normalization_eps`` before one global threshold (when ``use_normalization``)."""
  if updater.use_normalization:
    scores = jax.tree.map(
      lambda s, x: (
        x
        if s is None
        else (lambda a: a / (jnp.linalg.norm(a) + updater.normalization_eps))(
          selection.materialize(x)
        )
      ),
      sparsities,
      scores,
      is_leaf=lambda x: x is None,
    )
  return masks_from_scores(scores, sparsities)

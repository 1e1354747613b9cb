"""jaxpruner's sparse trainers with its defaults (see
:mod:`prunax.compat.jaxpruner._classes`): SET and RigL also skip the gradient step on
mask updates (``skip_gradients=True``) and accept ``is_debug`` and ``eps`` (stored, not
used: prunax's exact selection needs no tie-breaking epsilon)."""

from prunax import algorithms as _algorithms
from prunax.compat.jaxpruner._classes import compat_class

__all__ = ['SET', 'RigL', 'StaticRandomSparse']

_DST = {'skip_gradients': True, 'is_debug': False, 'eps': 1e-5, 'drop_fraction_fn': 'constant'}

StaticRandomSparse = compat_class(_algorithms.StaticRandomSparse, __name__)
SET = compat_class(_algorithms.SET, __name__, **_DST)
RigL = compat_class(_algorithms.RigL, __name__, **_DST)

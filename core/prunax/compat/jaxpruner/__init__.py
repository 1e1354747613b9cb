"""jaxpruner's forms that differ from prunax's own (``import prunax as jaxpruner`` needs
none of this; it is here for programs that want jaxpruner's exact output formats).

* :mod:`.utils`: ``summarize_sparsity`` / ``summarize_intersection`` with jaxpruner's
  keys (``'<a>/<b>'`` per leaf, every leaf counted, ``'_total_sparsity'``...).
* :mod:`.mask_calculator`: ``get_topk_fn(sparsity_type)`` and the top-k functions.

``prunax.utils`` and ``prunax.mask_calculator`` are these modules.
"""

from prunax.compat.jaxpruner import mask_calculator
from prunax.compat.jaxpruner import utils
from prunax.compat.jaxpruner.mask_calculator import get_topk_fn
from prunax.compat.jaxpruner.utils import summarize_intersection
from prunax.compat.jaxpruner.utils import summarize_sparsity

__all__ = [
  'get_topk_fn',
  'mask_calculator',
  'summarize_intersection',
  'summarize_sparsity',
  'utils',
]

"""One-shot post-training pruning from calibration data (magnitude, Wanda, SparseGPT).

* :func:`prune`: prunes every matmul kernel of a trained model (any JAX function of the
  params: flax linen, nnx, scanned layers) layer by layer from calibration batches and
  returns pruned params, keep-masks (for ``FixedMaskSparse``, ``export``,
  ``summarize_sparsity``) and a per-layer table.
* :func:`sparsegpt_prune`, :func:`wanda_prune`, :func:`magnitude_prune`: one layer, as pure
  functions of an ``(in, out)`` kernel and its input Hessian ``2 X^T X / N``;
  :func:`register_method` adds another.
* :func:`find_sites`: the kernels of a model and which inputs they read.
"""

from prunax.oneshot.capture import Site
from prunax.oneshot.capture import find_sites
from prunax.oneshot.driver import LayerReport
from prunax.oneshot.driver import OneShotResult
from prunax.oneshot.driver import format_table
from prunax.oneshot.driver import parse_sparsity_type
from prunax.oneshot.driver import prune
from prunax.oneshot.methods import get_method
from prunax.oneshot.methods import gram
from prunax.oneshot.methods import magnitude_prune
from prunax.oneshot.methods import method_names
from prunax.oneshot.methods import reconstruction_error
from prunax.oneshot.methods import register_method
from prunax.oneshot.methods import sparsegpt_prune
from prunax.oneshot.methods import wanda_prune
from prunax.oneshot.methods import wanda_scores

__all__ = [
  'LayerReport',
  'OneShotResult',
  'Site',
  'find_sites',
  'format_table',
  'get_method',
  'gram',
  'magnitude_prune',
  'method_names',
  'parse_sparsity_type',
  'prune',
  'reconstruction_error',
  'register_method',
  'sparsegpt_prune',
  'wanda_prune',
  'wanda_scores',
]

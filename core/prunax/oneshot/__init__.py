"""One-shot post-training pruning from calibration data (magnitude, Wanda, SparseGPT)."""

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
  "LayerReport",
  "OneShotResult",
  "Site",
  "find_sites",
  "format_table",
  "get_method",
  "gram",
  "magnitude_prune",
  "method_names",
  "parse_sparsity_type",
  "prune",
  "reconstruction_error",
  "register_method",
  "sparsegpt_prune",
  "wanda_prune",
  "wanda_scores",
]

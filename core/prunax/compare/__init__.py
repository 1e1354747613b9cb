"""``prunax compare``: every algorithm on the same task and recipe, over several seeds.

The JaxPruner paper's Table 1 on your own problem, compared as the Sparseland handbook
(section 3.10) asks: one recipe for all, mean and standard deviation over seeds, each
algorithm labelled with its category. See :func:`run_comparison` and ``prunax compare -h``.
"""

from prunax.compare.config import ConfigError
from prunax.compare.config import load_config
from prunax.compare.plots import write_plots
from prunax.compare.report import html_report
from prunax.compare.report import markdown
from prunax.compare.report import print_table
from prunax.compare.report import rows
from prunax.compare.report import write_reports
from prunax.compare.runner import Comparison
from prunax.compare.runner import Sweep
from prunax.compare.runner import category
from prunax.compare.runner import load_params
from prunax.compare.runner import run_comparison
from prunax.compare.runner import run_sweep
from prunax.compare.tasks import SupervisedTask
from prunax.compare.tasks import Task
from prunax.compare.tasks import TrainResult
from prunax.compare.tasks import available_tasks
from prunax.compare.tasks import digits_task

__all__ = [
  'Comparison',
  'ConfigError',
  'SupervisedTask',
  'Task',
  'TrainResult',
  'available_tasks',
  'category',
  'digits_task',
  'load_config',
  'load_params',
  'markdown',
  'print_table',
  'rows',
  'run_comparison',
  'write_plots',
  'write_reports',
  'Sweep',
  'run_sweep',
  'html_report',
]

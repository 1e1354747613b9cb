"""Settings of the whole suite, made before JAX starts its backend (see ``xla_env``)."""

import os

from tests.xla_env import suite_flags

os.environ['XLA_FLAGS'] = suite_flags(os.environ.get('XLA_FLAGS', ''))

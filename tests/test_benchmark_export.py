"""The export sizes `python -m benchmarks.run` reports, against their byte formulas."""

import jax
import pytest

from benchmarks import run


@pytest.mark.parametrize('shape', [(64, 128), (128, 64)])
def test_export_ratios_match_the_formats_bytes(shape):
  # The N:M export used to group along another axis than the 2:4 selection, and the full
  # benchmark run stopped with a ValueError there.
  w = jax.random.normal(jax.random.PRNGKey(1), shape)
  size = w.size
  kept = int(0.1 * size)
  ratios = run.export_ratios(w)
  # BCOO: a float32 value and two int32 indices per kept weight.
  assert ratios['bcoo'] == pytest.approx(kept * 12 / (size * 4))
  # BCSR: a float32 value and an int32 column per kept weight, an int32 pointer per row + 1.
  assert ratios['bcsr'] == pytest.approx((kept * 8 + (shape[0] + 1) * 4) / (size * 4))
  # 2:4: half the values, and 2 bits of position per kept value.
  assert ratios['nm_2_4'] == pytest.approx((size // 2 * 4 + size // 2 * 2 // 8) / (size * 4))

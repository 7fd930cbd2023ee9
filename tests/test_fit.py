"""`lm_align.sweeps.fit.power_law` on synthetic data with known exponents."""

import numpy as np
import pytest

from lm_align.sweeps.fit import power_law


def coverage(offset: bool, points: int, trials: int = 100):
    hits, widths = 0, []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        x = np.geomspace(1e5, 1e8, points)
        if offset:  # loss vs compute: a power law above an irreducible 1.5
            y = 5.0 * x**-0.3 * np.exp(rng.normal(0, 0.03, points)) + 1.5
        else:
            y = 3.0 * x**-0.3 * np.exp(rng.normal(0, 0.05, points))
        fit = power_law(x, y, offset=offset, seed=seed, num_bootstrap=200)
        lo, hi = fit.exponent_ci
        hits += lo <= -0.3 <= hi
        widths.append(hi - lo)
    return hits / trials, float(np.mean(widths))


@pytest.mark.parametrize("offset, points", [(False, 20), (True, 8)])
def test_intervals_cover_the_true_exponent(offset, points):
    rate, width = coverage(offset, points)
    assert rate >= 0.9
    assert width < (0.2 if offset else 0.03)  # and are not vacuously wide (vs |exponent| 0.3)


def test_exact_data_and_the_offset():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    fit = power_law(x, 2.0 * x**-0.5 + 0.7, offset=True)
    assert fit.exponent == pytest.approx(-0.5, abs=2e-3)
    assert fit.offset == pytest.approx(0.7, abs=2e-3)
    assert fit(64.0) == pytest.approx(2.0 * 64**-0.5 + 0.7, rel=1e-3)
    no_offset = power_law(x, 2.0 * x**-0.5 + 0.7)
    assert abs(no_offset.exponent + 0.5) > 0.1  # the floor matters: ignoring it biases the exponent


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="positive"):
        power_law([1, 2, 3], [1, -1, 2])
    with pytest.raises(ValueError, match="at least 4 points"):
        power_law([1, 2, 3], [1, 2, 3], offset=True)
    with pytest.raises(ValueError, match="two distinct x"):
        power_law([2, 2, 2], [1, 2, 3])

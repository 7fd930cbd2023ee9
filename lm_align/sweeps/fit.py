"""Power laws with bootstrap confidence intervals (numpy only).

    >>> import numpy as np
    >>> x = np.array([1e6, 3e6, 1e7, 3e7, 1e8])
    >>> fit = power_law(x, 2.0 * x ** -0.3)
    >>> round(fit.coef, 6), round(fit.exponent, 6)
    (2.0, -0.3)
    >>> bool(fit(1e9) < fit(1e8))
    True

Fits y = coef * x^exponent (+ offset), the forms of scaling studies: optimal
LR vs width, loss vs compute with an irreducible loss (`offset=True`),
LR sensitivity vs model size. Without an offset the fit is least squares on
log y = log coef + exponent log x (multiplicative noise); with one, least
squares on log(y - offset) for the offset in [0, min y) that minimises the
squared error of y itself (a grid search, refined once). The 95% intervals are
percentile intervals of the case bootstrap (points resampled with
replacement, the fit repeated), widened by sqrt(n / (n - k)) for the k fitted
parameters (the bootstrap's small-sample bias), so they hold without assuming
the noise's form.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

_OFFSET_GRID = 48  # offsets per search round (two rounds: coarse, then between neighbours)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """y = coef * x^exponent + offset, with 95% bootstrap intervals (lo, hi)."""

    coef: float
    exponent: float
    offset: float
    coef_ci: tuple[float, float]
    exponent_ci: tuple[float, float]
    offset_ci: tuple[float, float]
    num_points: int
    num_bootstrap: int
    bootstrap: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    with_offset: bool = False  # the offset was fitted (one more parameter)

    def __call__(self, x):
        return self.coef * np.asarray(x, float) ** self.exponent + self.offset

    def predict_ci(self, x: float) -> tuple[float, float]:
        """95% interval of the fitted curve at `x`: the bootstrap fits' values there,
        percentile interval widened like the parameters' (an extrapolation's error grows
        with its distance from the data, and this interval does too)."""
        if self.bootstrap is None or not len(self.bootstrap):
            return (math.nan, math.nan)
        coef, exponent, offset = self.bootstrap.T
        values = coef * float(x) ** exponent + offset
        lo, hi = np.percentile(values, [2.5, 97.5])
        lo, hi = _widened(float(self(x)), lo, hi, self.num_points, self.with_offset)
        return (float(lo), float(hi))

    def describe(self) -> str:
        lo, hi = self.exponent_ci
        text = f"y = {self.coef:.4g} x^{self.exponent:.4f} (95% CI {lo:.4f} .. {hi:.4f})"
        if self.offset:
            text += f" + {self.offset:.4g} (95% CI {self.offset_ci[0]:.4g} .. {self.offset_ci[1]:.4g})"
        return text


def _widened(est, lo, hi, n: int, offset: bool):
    """A percentile interval (lo, hi) about `est` widened by sqrt(n / (n - k)), k fitted
    parameters: the case bootstrap underestimates the spread with few points."""
    widen = math.sqrt(n / max(n - (3 if offset else 2), 1))
    return est - (est - lo) * widen, est + (hi - est) * widen


def _log_linear(logx_BN, logy_BN):
    """Least-squares (intercept, slope, residual sum of squares) per row of [..., N]."""
    mx, my = logx_BN.mean(-1, keepdims=True), logy_BN.mean(-1, keepdims=True)
    dx, dy = logx_BN - mx, logy_BN - my
    sxx, sxy = np.sum(dx * dx, -1), np.sum(dx * dy, -1)
    slope = sxy / np.where(sxx > 0, sxx, np.nan)
    intercept = my[..., 0] - slope * mx[..., 0]
    return intercept, slope, np.sum(dy * dy, -1) - slope * sxy


def _fit_rows(x_BN, y_BN, offset: bool):
    """(coef, exponent, offset) for each row of points."""
    logx = np.log(x_BN)
    if not offset:
        a, b, _ = _log_linear(logx, np.log(y_BN))
        return np.exp(a), b, np.zeros_like(a)
    # Offsets in [0, min y), dense near min y; the squared error of y for each, then
    # a finer grid between the best one's neighbours.
    ymin = y_BN.min(-1, keepdims=True)
    frac_BG = np.broadcast_to(1.0 - np.geomspace(1.0, 1e-4, _OFFSET_GRID), (len(y_BN), _OFFSET_GRID))
    for _ in range(2):
        c_BG = ymin * frac_BG
        shifted = np.log(np.maximum(y_BN[:, None, :] - c_BG[..., None], 1e-300))
        a, b, _ = _log_linear(np.broadcast_to(logx[:, None, :], shifted.shape), shifted)
        pred = np.exp(a[..., None] + b[..., None] * logx[:, None, :]) + c_BG[..., None]
        sse = np.sum((pred - y_BN[:, None, :]) ** 2, -1)
        best = np.argmin(np.where(np.isfinite(sse), sse, np.inf), -1)
        rows = np.arange(len(best))
        lo = frac_BG[rows, np.maximum(best - 1, 0)]
        hi = frac_BG[rows, np.minimum(best + 1, _OFFSET_GRID - 1)]
        frac_BG = np.linspace(lo, hi, _OFFSET_GRID, axis=-1)
    rows = np.arange(len(best))
    return np.exp(a[rows, best]), b[rows, best], c_BG[rows, best]


def power_law(
    x: Sequence[float],
    y: Sequence[float],
    *,
    offset: bool = False,
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> PowerLawFit:
    """Fit y = coef * x^exponent (+ offset >= 0) with 95% case-bootstrap intervals.

    Args:
      x, y: positive values, at least 3 points (4 with an offset), two distinct x.
      offset: also fit an additive floor in [0, min y) (e.g. an irreducible loss).
      num_bootstrap: bootstrap resamples for the intervals.
      seed: of the resampling.

    Raises:
      ValueError: non-positive or non-finite values, too few points.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    need = 4 if offset else 3
    if x.shape != y.shape or x.ndim != 1 or len(x) < need:
        raise ValueError(f"power_law needs two 1-D arrays of at least {need} points; got {x.shape}, {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("power_law needs finite, positive x and y (it fits in log space)")
    if len(np.unique(x)) < 2:
        raise ValueError("power_law needs at least two distinct x values")
    coef, exponent, off = (v[0] for v in _fit_rows(x[None], y[None], offset))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(num_bootstrap, len(x)))
    boot = np.stack(_fit_rows(x[idx], y[idx], offset), -1)  # [B, 3]
    boot = boot[np.all(np.isfinite(boot), -1)]  # resamples with one distinct x
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    lo, hi = _widened(np.array([coef, exponent, off]), lo, hi, len(x), offset)
    return PowerLawFit(
        float(coef), float(exponent), float(off),
        (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1])), (float(lo[2]), float(hi[2])),
        len(x), len(boot), boot, offset,
    )  # fmt: skip

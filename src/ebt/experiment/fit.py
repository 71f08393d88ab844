"""Power laws fitted in log-log space, with bootstrap intervals, and the paper's rate gain.

A scaling curve y = a x^slope is a straight line log y = log a + slope log x; the fit is least
squares on the logs (numpy.polyfit). The paper compares two models by their scaling rates:
gain = |slope EBT| / |slope baseline| - 1 (positive: the EBT improves faster along the axis).
Intervals are percentile bootstraps: resample each model's points with replacement (keeping
at least two distinct x), refit, take the 2.5 and 97.5 percentiles. With a handful of points
the interval is wide, which is the honest reading of a handful of points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** slope, with the slope's bootstrap interval."""

    slope: float
    coefficient: float
    slope_low: float
    slope_high: float
    r_squared: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.coefficient * np.power(x, self.slope)


def _line(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(log_x, log_y, 1)
    return float(slope), float(intercept)


def _logs(x: list[float], y: list[float]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or len(xs) < 2 or len(set(xs.tolist())) < 2:
        raise ValueError("a power law needs at least two points with distinct x")
    if (xs <= 0).any() or (ys <= 0).any():
        raise ValueError("a log-log fit needs positive x and y")
    return np.log(xs), np.log(ys)


def bootstrap_slopes(x: list[float], y: list[float], samples: int, seed: int) -> np.ndarray:
    """Slopes of `samples` refits on points resampled with replacement (degenerate draws,
    with fewer than two distinct x, are redrawn)."""
    log_x, log_y = _logs(x, y)
    generator = np.random.default_rng(seed)
    slopes = np.empty(samples)
    filled = 0
    while filled < samples:
        index = generator.integers(0, len(log_x), len(log_x))
        if len(np.unique(log_x[index])) < 2:
            continue
        slopes[filled] = _line(log_x[index], log_y[index])[0]
        filled += 1
    return slopes


def fit_power_law(
    x: list[float], y: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> PowerLaw:
    """Least-squares log-log fit of y against x, with a bootstrap interval for the slope."""
    log_x, log_y = _logs(x, y)
    slope, intercept = _line(log_x, log_y)
    residual = log_y - (intercept + slope * log_x)
    spread = ((log_y - log_y.mean()) ** 2).sum()
    r_squared = 1.0 - float((residual**2).sum() / spread) if spread > 0 else 1.0
    low, high = _interval(bootstrap_slopes(x, y, samples, seed))
    return PowerLaw(slope, float(np.exp(intercept)), low, high, r_squared)


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def rate_gain(
    ebt: tuple[list[float], list[float]],
    baseline: tuple[list[float], list[float]],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """The paper's scaling-rate gain |slope EBT| / |slope baseline| - 1 with a bootstrap
    interval (each model's points resampled independently)."""
    ebt_slope = fit_power_law(*ebt, samples=2, seed=seed).slope
    baseline_slope = fit_power_law(*baseline, samples=2, seed=seed).slope
    ebt_draws = np.abs(bootstrap_slopes(*ebt, samples=samples, seed=seed))
    baseline_draws = np.abs(bootstrap_slopes(*baseline, samples=samples, seed=seed + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = ebt_draws / baseline_draws - 1.0
    low, high = _interval(gains[np.isfinite(gains)]) if np.isfinite(gains).any() else (0.0, 0.0)
    gain = abs(ebt_slope) / abs(baseline_slope) - 1.0 if baseline_slope else float("inf")
    return {"gain": gain, "low": low, "high": high}

"""Post-hoc calibration (Platt, isotonic, temperature) that says when it cannot be trusted.

Why the warnings: a calibrator fitted on a handful of positives, or a temperature that ran into
the optimiser's bound, silently rewrites every probability (a temperature of e^5 = 148 flattens
them all to ~0.5; one of 0.04 pushes them to 0/1). :func:`fit_calibrator` therefore attaches
warnings to the calibrator; the drivers store them with the run and print them on stderr, and the
uncalibrated probability is kept beside the calibrated one (``probability_raw`` in ``predictions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_embed import classifiers as clf
from cxr_embed.errors import ConfigError

CALIBRATIONS = ("none", "platt", "isotonic", "temperature")
#: Fewer positives or negatives than this on the calibration rows gives a warning.
MIN_CLASS_ROWS = 30
#: The temperature search runs over log T in [-LOG_T_BOUND, LOG_T_BOUND].
LOG_T_BOUND = 5.0


@dataclass
class Calibrator:
    """Post-hoc map from a classifier's probability to a calibrated one, fitted on held-out rows.

    ``platt``: sigmoid(a*logit(p)+b); ``temperature``: sigmoid(logit(p)/T) (one parameter, keeps
    the ranking and the 0.5 point); ``isotonic``: monotone step function (sklearn).
    """

    method: str
    a: float = 1.0
    b: float = 0.0
    isotonic: Any = None
    warnings: list[str] = field(default_factory=list)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.method == "isotonic":
            return np.clip(self.isotonic.predict(p), 0.0, 1.0)
        return clf._sigmoid(self.a * logit(p) + self.b)

    @property
    def temperature(self) -> float | None:
        return 1.0 / self.a if self.method == "temperature" else None


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def check_method(method: str) -> None:
    if method not in CALIBRATIONS:
        raise ConfigError(f"Unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}.")


def size_warning(method: str, y: np.ndarray) -> str | None:
    """A warning when the calibration rows hold fewer than :data:`MIN_CLASS_ROWS` of either class."""
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(pos, neg) >= MIN_CLASS_ROWS:
        return None
    return (
        f"{method} calibration was fitted on {pos} positives and {neg} negatives (fewer than "
        f"{MIN_CLASS_ROWS} of a class): the calibrated probabilities are unreliable; compare probability_raw."
    )


def fit_temperature(z: np.ndarray, y: np.ndarray) -> tuple[float, str | None]:
    """Temperature minimising the log-loss of sigmoid(z / T); a warning when it sits at a bound."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        q = np.clip(clf._sigmoid(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    log_t = float(minimize_scalar(nll, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded").x)
    t = float(np.exp(log_t))
    warning = None
    if abs(log_t) > LOG_T_BOUND - 1e-2:
        warning = (
            f"the fitted temperature {t:.4g} sits at the optimiser's bound (e^{'-' if log_t < 0 else ''}"
            f"{LOG_T_BOUND:g}): the calibration rows cannot pin it down, so every probability is "
            f"{'flattened towards 0.5' if log_t > 0 else 'pushed to 0 or 1'}; compare probability_raw."
        )
    return t, warning


def fit_calibrator(method: str, p, y) -> Calibrator | None:
    """Fit ``method`` on held-out probabilities ``p`` with labels ``y``; None for "none" or one class."""
    check_method(method)
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y)
    if method == "none" or len(p) == 0 or len(np.unique(y)) < 2:
        return None
    warnings = [w for w in (size_warning(method, y),) if w]
    if method == "platt":
        a, b = clf._platt(logit(p), y)
        return Calibrator("platt", a, b, warnings=warnings)
    if method == "temperature":
        t, bound = fit_temperature(logit(p), y)
        return Calibrator("temperature", 1.0 / t, 0.0, warnings=warnings + ([bound] if bound else []))
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    return Calibrator("isotonic", isotonic=iso, warnings=warnings)

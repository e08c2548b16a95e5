"""Evaluation: metrics with bootstrap CIs and calibration, plus PNG figures.

Figures live in :mod:`medxfer.evaluate.figures` and are not imported here, so that computing
metrics does not pull in matplotlib.
"""

from __future__ import annotations

from medxfer.evaluate.metrics import (
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    format_summary,
    reliability_bins,
)

__all__ = [
    "bootstrap_ci",
    "compute_metrics",
    "expected_calibration_error",
    "format_summary",
    "reliability_bins",
]

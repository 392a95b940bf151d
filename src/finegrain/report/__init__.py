"""Run reports: one self-contained HTML page per run (curves, errors, calibration, embeddings, explanations)."""

from finegrain.report.build import build_report
from finegrain.report.screenshot import screenshot

__all__ = ["build_report", "screenshot"]

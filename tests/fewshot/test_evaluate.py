"""Episode accuracies: the mean and its 95% confidence interval."""

from __future__ import annotations

import pytest

from finegrain.fewshot.evaluate import mean_ci95


def test_mean_ci95():
    mean, ci = mean_ci95([50.0, 70.0])
    assert mean == 60.0 and ci == pytest.approx(1.96 * 10.0 / 2**0.5)

"""WarmupEma against a naive recurrence of the weights' average, and its saved state."""

import pytest
import torch
from torch import nn

from finegrain.cli import build_parser, config_from_args
from finegrain.train.ema import WarmupEma


def _weights(n: int) -> list[torch.Tensor]:
    """A weight that walks from 0 to 1 over ``n`` optimizer steps, as a fine-tune moves away from its start."""
    return [torch.full((3,), (k + 1) / n) for k in range(n)]


def _run(ema: WarmupEma, model: nn.Linear, weights: list[torch.Tensor]) -> None:
    for w in weights:
        with torch.no_grad():
            model.weight.copy_(w.view(1, 3))
        ema.update(model)


def _naive(weights: list[torch.Tensor], start: torch.Tensor, decay: float, warmup: bool) -> torch.Tensor:
    """The average as the docstring defines it: update k uses min(decay, 1 - k^(-2/3)), the first one copies."""
    avg = start.clone()
    for k, w in enumerate(weights, start=1):
        d = (0.0 if k == 1 else min(decay, 1 - k ** (-2 / 3))) if warmup else decay
        avg = d * avg + (1 - d) * w
    return avg


@pytest.mark.parametrize("warmup", [True, False])
def test_average_matches_the_naive_recurrence(warmup):
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = WarmupEma(model, decay=0.998, warmup=warmup)
    weights = _weights(120)
    _run(ema, model, weights)
    expected = _naive(weights, torch.zeros(3), 0.998, warmup)
    torch.testing.assert_close(ema.module.weight.view(3), expected, rtol=1e-5, atol=1e-6)
    assert int(ema.num_updates) == 120


def test_warmup_tracks_a_short_run_where_a_fixed_decay_keeps_the_start():
    """120 steps (3 epochs of cub50): without warmup 0.998 still holds 79% of the starting weights."""
    runs = {}
    for warmup in (True, False):
        model = nn.Linear(3, 1, bias=False)
        nn.init.zeros_(model.weight)
        ema = WarmupEma(model, decay=0.998, warmup=warmup)
        _run(ema, model, _weights(120))
        runs[warmup] = ema.module.weight.mean().item()
    assert runs[True] > 0.8  # near the last weights (1.0), a few steps behind
    assert runs[False] < 0.15  # 0.998^120 of the start (0) is left


def test_count_is_saved_and_resumed():
    weights = _weights(40)
    model = nn.Linear(3, 1, bias=False)
    straight = WarmupEma(model, decay=0.99)
    _run(straight, model, weights)

    model = nn.Linear(3, 1, bias=False)
    first = WarmupEma(model, decay=0.99)
    _run(first, model, weights[:15])
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = WarmupEma(nn.Linear(3, 1, bias=False), decay=0.99)
    resumed.load_state_dict(state)
    _run(resumed, model, weights[15:])
    torch.testing.assert_close(resumed.module.weight, straight.module.weight)
    assert int(resumed.num_updates) == 40


def test_state_saved_before_the_count_resumes_at_full_decay():
    model = nn.Linear(3, 1, bias=False)
    ema = WarmupEma(model, decay=0.9)
    old_state = {k: v for k, v in ema.state_dict().items() if k != "num_updates"}
    ema.load_state_dict(old_state)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)


def test_cli_turns_warmup_off():
    parser = build_parser()
    train = ["train", "--data", "x", "--ema"]
    assert config_from_args(parser.parse_args(train)).train.ema_warmup is True
    assert config_from_args(parser.parse_args([*train, "--no-ema-warmup"])).train.ema_warmup is False

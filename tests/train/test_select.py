"""Which epoch ``best.safetensors`` keeps: the trainer's selection rules against a naive offline pick.

The trainer decides epoch by epoch; the reference below looks at the whole validation curve at the
end, as the rule is defined (the one-standard-error rule: the latest epoch whose metric is within
one standard error of the highest). The two must agree on every curve, and ``best.safetensors``
must hold the weights of the epoch they name.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from finegrain import checkpoint as ckpt
from finegrain.tasks import TASKS, Task
from finegrain.train.run import top1_standard_error
from finegrain.train.trainer import SELECT, Trainer, TrainSetup

from ..conftest import tiny_config

VAL_IMAGES = 147  # the size of cub50's validation split

CURVES = {
    "late epochs within noise of an early peak": [70.0, 91.2, 88.4, 89.8, 89.1, 89.8],
    "a real drop after the peak": [60.0, 95.0, 94.0, 80.0, 79.0],
    "monotone": [50.0, 60.0, 70.0, 80.0],
    "ties": [80.0, 85.0, 85.0, 84.0, 70.0],
    "peak at the end": [88.0, 89.0, 87.0, 92.0],
}


def reference_pick(values: list[float], select: str, n: int) -> int:
    """The 1-based epoch the rule names, from the whole curve."""
    if select == "last":
        return len(values)
    top = max(values)
    if select == "best":
        return values.index(top) + 1
    se = 100 * math.sqrt(top / 100 * (1 - top / 100) / n)
    return max(i for i, v in enumerate(values) if v >= top - se) + 1


class _Scripted(Task):
    """A task whose validation curve is given; its bias is the epoch number, so a checkpoint says which epoch it is."""

    name = "scripted"

    def __init__(self):
        super().__init__(torch.nn.Linear(1, 1), 0)

    def forward(self, batch):
        return {"loss": self.model.bias.sum() * 0}  # lr 0: only the epoch hook moves the bias


def _run(run_dir, values, select, *, epochs=None, resume=False, max_epochs=None, standard_error=top1_standard_error):
    module = _Scripted()
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    meta = ckpt.describe(module, model={"backbone": "none", "pretrained": "none", "task": module.name}, classes=[],
                         preprocessing={"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3})
    seen = []

    def validate(m):
        return {"val_top1": values[len(seen)], "val_images": VAL_IMAGES}

    def on_epoch_start(epoch):
        seen[:] = range(epoch)  # the resumed run validates the epochs it trains
        with torch.no_grad():
            module.model.bias.fill_(epoch + 1)

    batch = {"image": torch.zeros(1, 1), "skipped": []}
    setup = TrainSetup(module=module, optimizer=opt, scheduler=None, batches=lambda e, s: [batch][s:],
                       epoch_images=lambda e, s: 1, validate=validate, metric="val_top1", standard_error=standard_error,
                       on_epoch_start=on_epoch_start)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run_dir, epochs=epochs or len(values), meta=meta, device=torch.device("cpu"), select=select)
    return trainer.run(setup, resume=resume, max_epochs=max_epochs)


@pytest.mark.parametrize("curve", list(CURVES))
@pytest.mark.parametrize("select", SELECT)
def test_the_trainer_keeps_the_epoch_the_rule_names(tmp_path, select, curve):
    values = CURVES[curve]
    result = _run(tmp_path, values, select)
    want = reference_pick(values, select, VAL_IMAGES)
    assert result.best_epoch == want
    assert result.best_metric == values[want - 1]
    weights, meta = ckpt.load(result.best_checkpoint)
    assert weights["model.bias"].item() == want and meta.epoch == want


def test_the_one_standard_error_rule_differs_from_the_highest_where_it_should():
    """The curves are chosen so that the rules disagree: otherwise the test above could not tell them apart."""
    late = CURVES["late epochs within noise of an early peak"]
    assert reference_pick(late, "best", VAL_IMAGES) == 2 and reference_pick(late, "1se", VAL_IMAGES) == 6
    drop = CURVES["a real drop after the peak"]
    assert reference_pick(drop, "1se", VAL_IMAGES) == 3 and reference_pick(drop, "last", VAL_IMAGES) == 5


@pytest.mark.parametrize("select", SELECT)
def test_a_resumed_run_keeps_the_same_epoch(tmp_path, select):
    """Stopped after epoch 3, whose 94.0 is the 1se pick but not the highest: the pick's metric must survive the resume."""
    values = CURVES["a real drop after the peak"]
    whole = _run(tmp_path / "whole", values, select)
    _run(tmp_path / "split", values, select, max_epochs=3)
    resumed = _run(tmp_path / "split", values, select, resume=True)
    assert (resumed.best_epoch, resumed.best_metric) == (whole.best_epoch, whole.best_metric)
    assert ckpt.load(resumed.best_checkpoint)[0]["model.bias"].item() == whole.best_epoch


def test_without_a_standard_error_1se_keeps_the_highest(tmp_path):
    """A metric with no standard error (a detector's mAP) falls back to the highest epoch, not to the last."""
    values = CURVES["late epochs within noise of an early peak"]
    assert _run(tmp_path, values, "1se", standard_error=None).best_epoch == reference_pick(values, "best", VAL_IMAGES)


def test_top1_standard_error_matches_the_spread_of_sampled_accuracies():
    """The binomial standard error against the empirical spread of top-1 over many simulated validation splits."""
    g = torch.Generator().manual_seed(0)
    for p, n in ((0.9, 147), (0.5, 40), (0.97, 1000)):
        draws = 100 * (torch.rand(20000, n, generator=g) < p).double().mean(1)
        assert top1_standard_error(100 * p, {"val_images": n}) == pytest.approx(draws.std().item(), rel=0.03)


def test_an_unknown_rule_is_refused():
    from finegrain.config import TrainConfig

    with pytest.raises(ValueError, match="--select must be one of best, last, 1se"):
        TrainConfig(select="median").check()
    with pytest.raises(ValueError, match="select='median'"):
        Trainer(".", epochs=1, meta=None, device=torch.device("cpu"), select="median")


@pytest.mark.parametrize("task", [t for t in TASKS.names() if TASKS.get(t).trainer == "supervised"])
def test_every_supervised_task_is_selected_on_top1_so_the_rule_has_its_standard_error(task):
    """``fit`` gives the standard error of val top-1; a task selected on another metric would silently fall back."""
    assert TASKS.get(task).selection_metric == "val_top1"


def test_fit_writes_the_picked_epoch_and_its_validation_size(image_folder, tmp_path):
    from finegrain.train.run import fit

    result = fit(tiny_config(image_folder, tmp_path, epochs=3, select="1se"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["val_top1"] for r in rows]
    assert all(r["val_images"] == rows[0]["val_images"] > 0 for r in rows)
    want = reference_pick(values, "1se", rows[0]["val_images"])
    assert result.best_epoch == want and ckpt.read_meta(result.best_checkpoint).epoch == want

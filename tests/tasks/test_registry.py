"""Every attention x pooling of the fgvc task and every registered task on the tiny test backbones:
one train step (shapes, no NaN, every parameter gets a gradient) and a checkpoint round trip."""

from __future__ import annotations

import pytest

from finegrain.models.attention import ATTENTIONS
from finegrain.models.backbone import create_backbone
from finegrain.models.pooling import POOLINGS
from finegrain.tasks import TASKS

from ..helpers import BACKBONES, _train_step_and_roundtrip

REGISTRY_CASES = {  # task -> (backbone, image size or None for the backbone's native size, task kwargs)
    "supervised": ("test_resnet", 32, {}),
    "fgvc": ("test_efficientnet", 32, {}),
    "wsdan": ("test_resnet", 64, {"num_parts": 4}),
    "transfg": ("test_vit", None, {}),
    "racnn": ("test_resnet", 64, {}),
    "parts": ("test_efficientnet", 64, {}),
    "parts-weak": ("test_resnet", 64, {}),
}
ELSEWHERE = {"distill": "needs a teacher checkpoint (tests/tasks/test_distill.py)",
             "fewshot_baseline": "episodic (tests/tasks/test_fewshot.py)", "maml": "episodic", "protonet": "episodic",
             "relationnet": "episodic", "detection": "boxes, not classes (tests/test_detect_task.py: every detector and backbone family)"}


def test_registry_cases_cover_every_task():
    assert set(TASKS.names()) <= set(REGISTRY_CASES) | set(ELSEWHERE)


@pytest.mark.parametrize("task_name", sorted(REGISTRY_CASES))
def test_every_registered_task(task_name, tmp_path):
    backbone, size, kw = REGISTRY_CASES[task_name]
    size = size or create_backbone(backbone, num_classes=3).pretrained_cfg["input_size"][1]
    task, _ = _train_step_and_roundtrip(backbone, task_name, tmp_path, size=size, **kw)
    if task.annotations:  # the annotations are for training only: predict works without them
        assert set(task.annotations) <= {"boxes", "parts"}


@pytest.mark.parametrize("pooling", POOLINGS.names())
@pytest.mark.parametrize("attention", ATTENTIONS.names())
@pytest.mark.parametrize("backbone", BACKBONES)
def test_fgvc_every_attention_and_pooling(backbone, attention, pooling, tmp_path):
    _train_step_and_roundtrip(backbone, "fgvc", tmp_path, size=32 if attention == "none" else 64,
                              attention=attention, pooling=pooling, pool_dim=128)

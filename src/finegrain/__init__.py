"""finegrain: fine-grained image recognition.

The public API::

    from finegrain import RunConfig, DataConfig, ModelConfig, TrainConfig, fit, evaluate, Predictor

    cfg = RunConfig(DataConfig(data="path/to/images", img_size=448), ModelConfig(backbone="resnet50"))
    run = fit(cfg)
    metrics = evaluate(run.best_checkpoint, "path/to/images", split="test")
    Predictor.from_checkpoint(run.best_checkpoint).predict(["bird.jpg"], topk=5)

    det = fit_detection(DetectConfig(data="instances_train.json", backbone="resnet50"), {"detector": "faster_rcnn"})
    evaluate(det["best_checkpoint"], "instances_test.json")          # COCO box (and mask) AP
    DetectThenClassify.from_checkpoints(det["run_dir"], run.best_checkpoint).predict(["feeder.jpg"])

``import finegrain`` fills the registries (every task in ``TASKS``, every reader in
``DATASETS``); the training, evaluation and inference entry points are imported when first used.
"""

import importlib

__version__ = "0.1.0"

from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from finegrain.data import DATASETS, ImageList, open_dataset  # noqa: E402
from finegrain.tasks import TASKS, Task  # noqa: E402

_LAZY = {
    "CheckpointMeta": "finegrain.checkpoint", "load_task": "finegrain.checkpoint", "read_meta": "finegrain.checkpoint",
    "create_backbone": "finegrain.models.backbone", "evaluate": "finegrain.eval.evaluate",
    "classification_metrics": "finegrain.eval.metrics", "Predictor": "finegrain.predict", "RunResult": "finegrain.train.run",
    "fit": "finegrain.train.run", "DetectConfig": "finegrain.detect.train", "fit_detection": "finegrain.detect.train",
    "DetectThenClassify": "finegrain.detect.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finegrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DATASETS", "TASKS", "CheckpointMeta", "DataConfig", "DetectConfig", "DetectThenClassify",
    "ImageList", "ModelConfig", "Predictor", "RunConfig", "RunResult",
    "Task", "TrainConfig", "classification_metrics", "create_backbone", "evaluate", "fit", "load_task", "open_dataset",
    "fit_detection", "read_meta",
]

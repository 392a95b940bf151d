"""finegrain: fine-grained image recognition.

The public API::

    from finegrain import RunConfig, DataConfig, ModelConfig, TrainConfig, fit, evaluate, Predictor

    cfg = RunConfig(DataConfig(data="path/to/images", img_size=448), ModelConfig(backbone="resnet50"))
    run = fit(cfg)
    metrics = evaluate(run.best_checkpoint, "path/to/images", split="test")
    Predictor.from_checkpoint(run.best_checkpoint).predict(["bird.jpg"], topk=5)
"""

__version__ = "0.1.0"

from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from finegrain.data.base import DATASETS, ImageList
from finegrain.data.datasets import open_dataset
from finegrain.eval.evaluate import evaluate
from finegrain.eval.metrics import classification_metrics
from finegrain.models.backbone import create_backbone
from finegrain.predict import Predictor
from finegrain.tasks import TASKS, Task
from finegrain.train.checkpoint import load_checkpoint
from finegrain.train.run import RunResult, fit

__all__ = [
    "DATASETS", "TASKS", "DataConfig", "ImageList", "ModelConfig", "Predictor", "RunConfig", "RunResult",
    "Task", "TrainConfig", "classification_metrics", "create_backbone", "evaluate", "fit", "load_checkpoint",
    "open_dataset",
]

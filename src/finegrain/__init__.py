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
from finegrain.data import DATASETS, ImageList, open_dataset
from finegrain.tasks import TASKS, Task
from finegrain.checkpoint import CheckpointMeta, load_task, read_meta
from finegrain.models.backbone import create_backbone
from finegrain.eval.evaluate import evaluate
from finegrain.eval.metrics import classification_metrics
from finegrain.predict import Predictor
from finegrain.train.run import RunResult, fit

__all__ = [
    "DATASETS", "TASKS", "CheckpointMeta", "DataConfig", "ImageList", "ModelConfig", "Predictor", "RunConfig", "RunResult",
    "Task", "TrainConfig", "classification_metrics", "create_backbone", "evaluate", "fit", "load_task", "open_dataset",
    "read_meta",
]

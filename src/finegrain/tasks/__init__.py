"""Tasks: every method (supervised, fgvc, WS-DAN, RA-CNN, parts, TransFG, distillation and the few-shot
methods) as an ``nn.Module`` whose ``forward(batch)`` returns the loss; all are registered in ``TASKS``."""

from finegrain.tasks import detection, distill, fewshot, fgvc, parts, racnn, supervised, transfg, wsdan  # noqa: F401,E402  (registers the tasks)
from finegrain.tasks.base import (
    TASKS,
    BuildContext,
    LoadedCheckpoint,
    Task,
    TaskOptions,
    build_task,
    classifier_tasks,
    detection_tasks,
    plain_classifier_tasks,
    require_classifier,
    require_plain_classifier,
    resolve_options,
)

__all__ = ["TASKS", "BuildContext", "LoadedCheckpoint", "Task", "TaskOptions", "build_task", "classifier_tasks", "detection_tasks",
           "plain_classifier_tasks", "require_classifier", "require_plain_classifier", "resolve_options"]

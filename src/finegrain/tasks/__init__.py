from finegrain.tasks.base import TASKS, Task, build_task
from finegrain.tasks import distill, fgvc, parts, racnn, supervised, transfg, wsdan  # noqa: F401  (registers the tasks)

__all__ = ["TASKS", "Task", "build_task"]

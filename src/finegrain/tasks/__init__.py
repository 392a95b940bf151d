from finegrain.tasks.base import TASKS, Task, build_task
from finegrain.tasks import distill, fgvc, supervised, transfg, wsdan  # noqa: F401  (registers the tasks)

__all__ = ["TASKS", "Task", "build_task"]

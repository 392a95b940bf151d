from finegrain.tasks.base import TASKS, Task, build_task
from finegrain.tasks import supervised  # noqa: F401  (registers "supervised")

__all__ = ["TASKS", "Task", "build_task"]

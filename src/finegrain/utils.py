"""Small shared helpers: the console, progress bars and device choice."""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


class _Bar:
    def __init__(self, progress: Progress | None, task_id, total: int, unit: str = "img"):
        self.progress, self.task_id, self.total, self.done, self.unit = progress, task_id, total, 0, unit
        self.t0 = None

    def advance(self, n: int, **fields: float) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.done += n
        if self.progress is None:
            return
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        info = " ".join(f"{k} {v:.3f}" if k == "loss" else f"{k} {v:.1f}" for k, v in fields.items())
        self.progress.update(self.task_id, advance=n, rate=f"{rate:.1f} {self.unit}/s", **({"info": info} if info else {}))


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool | None = None, unit: str = "img"):
    """A rich progress bar (``unit``s done, their rate, loss/acc fields); silent when not a terminal."""
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        yield _Bar(None, None, total, unit)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    with progress:
        tid = progress.add_task(description, total=total, rate="", info="")
        yield _Bar(progress, tid, total, unit)

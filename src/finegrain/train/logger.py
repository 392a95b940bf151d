"""Per-epoch rows of a run: ``metrics.jsonl``, TensorBoard (when installed) and Weights & Biases (when asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from finegrain.checkpoint import write_text_atomic
from finegrain.config import RunConfig


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a last line cut short by a crash mid-write is left out."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < lines[-1][0]:  # only the last line can be cut by a crash; anything else is damage
                raise ValueError(f"{path}, line {i}: not a JSON row ({line[:60]!r})") from None
    return rows


class RunLogger:
    """Per-epoch rows to ``metrics.jsonl``, TensorBoard (when installed) and Weights & Biases (when asked)."""

    def __init__(self, run_dir: Path, cfg: RunConfig | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        project = cfg.train.wandb_project if cfg is not None else None
        if project:
            import weakref

            self.wandb = self._start_wandb(run_dir, cfg, project)
            # fit has no close hook: the W&B run finishes when this logger goes away (fit returned or raised).
            weakref.finalize(self, self.wandb.finish)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # noqa: BLE001  (TensorBoard is optional)
            self.tb = None

    @staticmethod
    def _start_wandb(run_dir: Path, cfg: RunConfig, project: str):
        import uuid

        mode = cfg.train.wandb_mode
        if mode not in ("offline", "online"):
            raise ValueError(f"--wandb-mode must be offline or online, got {mode!r}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb-project needs Weights & Biases: pip install 'finegrain[track]'") from e
        # A run id kept in the run folder, so that --resume continues the same W&B run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        write_text_atomic(id_file, run_id + "\n")
        run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow",
                         config=cfg.to_dict())
        return run

    def log(self, row: dict) -> None:
        """Append ``row`` as one line, on disk before this returns. A line cut short by a crash during
        the previous append is dropped first, so the file stays one JSON row per line."""
        with open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(size - 65536, 0)  # a row is far shorter than this
            f.seek(start)
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                f.truncate(start + tail.rfind(b"\n") + 1)  # rfind is -1 when the whole tail is the cut line
            f.write((json.dumps(row) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["epoch"])

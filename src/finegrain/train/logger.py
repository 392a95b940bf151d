"""Per-epoch rows of a run: ``metrics.jsonl``, TensorBoard (when installed) and Weights & Biases (when asked)."""

from __future__ import annotations

import json
from pathlib import Path

from finegrain.config import RunConfig


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
        id_file.write_text(run_id + "\n")
        run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow",
                         config=cfg.to_dict())
        return run

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["epoch"])

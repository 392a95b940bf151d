"""``finegrain demo``: fine-tune a pretrained backbone on real fine-grained photos, then test it.

Here it uses the shared data beside the checkout (``../shared/data``: flowers12 and the
EfficientNet-Lite0 ImageNet weights). On a machine with internet and no shared data it
downloads Oxford Flowers-102 through torchvision and timm's hub weights instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig

WEIGHTS = "weights/efficientnet_lite0.in1k.safetensors"


def find_shared_data() -> Path | None:
    """``$FINEGRAIN_SHARED_DATA``, else ``../shared/data`` or ``shared/data`` from the working directory."""
    candidates = [os.environ.get("FINEGRAIN_SHARED_DATA"), "../shared/data", "shared/data"]
    for c in candidates:
        if c and (Path(c) / "flowers12").is_dir():
            return Path(c).resolve()
    return None


def demo_config(*, epochs: int = 2, out: str = "runs", data: str | None = None, workers: int | None = None) -> RunConfig:
    shared = find_shared_data()
    if data is not None or shared is not None:
        data_path = data or str(shared / "flowers12")
        weights = str(shared / WEIGHTS) if shared is not None and (shared / WEIGHTS).is_file() else "hub"
        dataset = None
    else:  # a machine with internet and no shared folder: Flowers-102 and hub weights
        data_path, weights, dataset = str(Path(out) / "data" / "flowers102"), "hub", "flowers102"
    return RunConfig(
        data=DataConfig(data=data_path, dataset=dataset, download=dataset is not None, img_size=224,
                        batch_size=32, **({} if workers is None else {"workers": workers})),
        model=ModelConfig(backbone="efficientnet_lite0", pretrained=weights),
        train=TrainConfig(epochs=epochs, out=out, name=None),
    )


def run_demo(*, epochs: int = 2, out: str = "runs", data: str | None = None) -> dict:
    """Train, then evaluate the best checkpoint on the test split; return the test metrics."""
    from finegrain.eval.evaluate import evaluate, print_summary
    from finegrain.train.run import fit
    from finegrain.utils import console

    cfg = demo_config(epochs=epochs, out=out, data=data)
    console.print(f"demo: fine-tuning {cfg.model.backbone} ({cfg.model.pretrained}) on {cfg.data.data} "
                  f"at {cfg.data.img_size}px for {cfg.train.epochs} epochs")
    result = fit(cfg)
    metrics = evaluate(result.best_checkpoint, cfg.data.data, split="test", dataset=cfg.data.dataset)
    print_summary(metrics)
    console.print(f"run folder: {result.run_dir}\ntest results: {metrics['out_dir']}")
    return metrics


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune on real fine-grained photos and report test metrics")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="runs")
    p.add_argument("--data", default=None, help="image folder with train/ and test/ (default: shared flowers12)")
    p.set_defaults(func=lambda a: (run_demo(epochs=a.epochs, out=a.out, data=a.data), 0)[1])

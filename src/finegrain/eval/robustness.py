"""``robustness_eval``: accuracy of a checkpoint under common corruptions (see :mod:`.corruptions`).

Corruptions are applied where ImageNet-C applies them: to the eval crop (after resize + center
crop, before normalisation), so an occluded fraction means a fraction of what the model sees.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from finegrain.checkpoint import resolve_checkpoint
from finegrain.data.base import open_dataset
from finegrain.data.dataset import collate, load_rgb
from finegrain.eval.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt
from finegrain.eval.evaluate import eval_images
from finegrain.train.loop import predict_loader
from finegrain.utils import console, progress_bar


class _CorruptedDataset(Dataset):
    """Eval crop -> corruption (seeded per image) -> tensor; unreadable files are skipped."""

    def __init__(self, images, preprocessing: dict, name: str | None, severity: int, seed: int):
        self.images, self.prep, self.name, self.severity, self.seed = images, preprocessing, name, severity, seed
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(preprocessing["mean"], preprocessing["std"])])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from finegrain.explain.cam import display_crop

        path = self.images.paths[i]
        try:
            img = display_crop(load_rgb(path), self.prep)
        except Exception as e:  # noqa: BLE001
            return {"skipped": path, "error": f"{type(e).__name__}: {e}"}
        if self.name is not None:
            img = corrupt(img, self.name, self.severity, seed=self.seed * 1_000_003 + i)
        return {"image": self.to_tensor(img), "label": self.images.labels[i], "index": i}


def robustness_eval(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    limit: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
) -> dict:
    """Top-1 accuracy of ``checkpoint`` on ``split`` of ``data``, clean and under each corruption.

    Args:
        corruptions: names from :data:`~finegrain.eval.corruptions.CORRUPTIONS` (default: all).
        severities: which of 1..5 to run.
        limit: evaluate only the first ``limit`` images (a stratified subset is not attempted).
        seed: base seed of the random corruptions; image ``i`` uses its own derived seed.
        out_dir: where ``robustness.json`` and ``robustness.png`` go (default:
            ``robust-<split>`` beside the checkpoint).

    Returns:
        ``{"clean": acc, "results": {corruption: {severity: acc}}, "mean": {corruption: mean acc},
        "mean_drop": {corruption: clean - mean}, "mean_corruption_acc", "mean_drop_all", ...}``;
        accuracies are top-1 in percent.
    """
    from finegrain.predict import Predictor

    names = list(corruptions) if corruptions else CORRUPTIONS.names()
    for n in names:
        CORRUPTIONS.get(n)
    bad = [s for s in severities if not 1 <= int(s) <= MAX_SEVERITY]
    if bad or not severities:
        raise ValueError(f"severities must be in 1..{MAX_SEVERITY}, got {list(severities)}")
    path = resolve_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(path, device=device)
    images, _ = eval_images(open_dataset(data, split, dataset=dataset), predictor.classes, data)
    if limit is not None:
        images = images.subset(list(range(min(limit, len(images)))))
    prep = predictor.meta["preprocessing"]

    def accuracy(name: str | None, severity: int) -> tuple[float, list]:
        ds = _CorruptedDataset(images, prep, name, severity, seed)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        with torch.no_grad():
            logits, labels, skipped = predict_loader(predictor.task.predict, loader, device=predictor.device)
        return 100.0 * (logits.argmax(1) == labels).float().mean().item(), skipped

    t0 = time.perf_counter()
    runs = [(None, 0)] + [(n, int(s)) for n in names for s in severities]
    results: dict[str, dict[str, float]] = {n: {} for n in names}
    with progress_bar("robustness", total=len(runs)) as bar:
        clean, skipped = accuracy(None, 0)
        bar.advance(1)
        for n, s in runs[1:]:
            results[n][str(s)], _ = accuracy(n, s)
            bar.advance(1)
    mean = {n: sum(v.values()) / len(v) for n, v in results.items()}
    report = {
        "checkpoint": str(path), "data": str(data), "split": split, "n": len(images) - len(skipped),
        "seed": seed, "severities": [int(s) for s in severities],
        "clean": clean, "results": results, "mean": mean,
        "mean_drop": {n: clean - m for n, m in mean.items()},
        "mean_corruption_acc": sum(mean.values()) / len(mean),
        "mean_drop_all": clean - sum(mean.values()) / len(mean),
        "skipped": [p for p, _ in skipped], "seconds": time.perf_counter() - t0,
    }
    out = Path(out_dir) if out_dir else path.parent / f"robust-{split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=1))
    save_robustness_plot(report, out / "robustness.png")
    report["out_dir"] = str(out)
    return report


def save_robustness_plot(report: dict, path: str | Path) -> None:
    """Accuracy vs severity, one line per corruption, clean accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, accs in report["results"].items():
        sev = sorted(int(s) for s in accs)
        ax.plot(sev, [accs[str(s)] for s in sev], marker="o", label=name)
    ax.axhline(report["clean"], color="k", linestyle="--", label="clean")
    ax.set_xlabel("severity")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(report["severities"])
    ax.set_ylim(0, 100)
    ax.set_title(f"robustness on {report['split']} ({report['n']} images)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_robustness(report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"clean top-1 {report['clean']:.2f}  |  mean under corruption {report['mean_corruption_acc']:.2f}")
    t.add_column("corruption")
    for s in report["severities"]:
        t.add_column(f"s{s}", justify="right")
    t.add_column("mean drop", justify="right")
    for n, accs in report["results"].items():
        t.add_row(n, *(f"{accs[str(s)]:.1f}" for s in report["severities"]), f"{report['mean_drop'][n]:.1f}")
    console.print(t)

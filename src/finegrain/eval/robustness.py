"""``robustness_eval``: accuracy of a checkpoint under common corruptions (see :mod:`.corruptions`)
and under L-inf adversarial attacks (FGSM, PGD; see :mod:`finegrain.train.adversarial`).

Corruptions are applied where ImageNet-C applies them: to the eval crop (after resize + center
crop, before normalisation), so an occluded fraction means a fraction of what the model sees.
Attacks perturb the same crop: eps is in 1/255 of its [0, 1] pixel range, and every adversarial
image stays in [0, 1].
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from finegrain.checkpoint import atomic_write, resolve_checkpoint, write_text_atomic
from finegrain.data.base import open_dataset
from finegrain.data.dataset import collate, load_rgb
from finegrain.eval.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt
from finegrain.eval.evaluate import eval_images
from finegrain.train.adversarial import Attack, adversarial_images, make_attack
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
    attacks: Sequence[str] = (),
    epsilons: Sequence[float] = (1, 2, 4),
    attack_steps: int = 10,
    limit: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
) -> dict:
    """Top-1 accuracy of ``checkpoint`` on ``split`` of ``data``, clean and under each corruption.

    Args:
        corruptions: names from :data:`~finegrain.eval.corruptions.CORRUPTIONS` (default: all;
            an empty list: none, e.g. for attacks only).
        severities: which of 1..5 to run.
        attacks: names from :data:`~finegrain.train.adversarial.ATTACKS` (``fgsm``, ``pgd``,
            ``fast``) to run at each of ``epsilons`` (in 1/255); PGD keeps each image's worst
            iterate and takes ``attack_steps`` steps of ``2.5 eps / steps``.
        limit: evaluate only the first ``limit`` images (a stratified subset is not attempted).
        seed: base seed of the random corruptions; image ``i`` uses its own derived seed.
        out_dir: where ``robustness.json`` and ``robustness.png`` go (default:
            ``robust-<split>`` beside the checkpoint).

    Returns:
        ``{"clean": acc, "results": {corruption: {severity: acc}}, "mean": {corruption: mean acc},
        "mean_drop": {corruption: clean - mean}, "mean_corruption_acc", "mean_drop_all", ...}``,
        with attacks also ``"adversarial": {"results": {attack: {eps: acc}}, "settings": {attack:
        {...}}, ...}`` (see :func:`adversarial_accuracy`); accuracies are top-1 in percent.
    """
    from finegrain.predict import Predictor

    names = CORRUPTIONS.names() if corruptions is None else list(corruptions)
    for n in names:
        CORRUPTIONS.get(n)
    adversaries = _attacks(attacks, epsilons, attack_steps)
    bad = [s for s in severities if not 1 <= int(s) <= MAX_SEVERITY]
    if bad or not severities:
        raise ValueError(f"severities must be in 1..{MAX_SEVERITY}, got {list(severities)}")
    path = resolve_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(path, device=device)
    images, _ = eval_images(open_dataset(data, split, dataset=dataset), predictor.classes, data)
    if limit is not None:
        images = images.subset(list(range(min(limit, len(images)))))
    prep = predictor.meta["preprocessing"]
    t0 = time.perf_counter()
    clean, results, skipped = _corruption_results(predictor, images, names, severities, seed=seed, batch_size=batch_size,
                                                  workers=workers)
    mean = {n: sum(v.values()) / len(v) for n, v in results.items()}
    overall = sum(mean.values()) / len(mean) if mean else None
    report = {
        "checkpoint": str(path), "data": str(data), "split": split, "n": len(images) - len(skipped),
        "seed": seed, "severities": [int(s) for s in severities],
        "clean": clean, "results": results, "mean": mean,
        "mean_drop": {n: clean - m for n, m in mean.items()},
        "mean_corruption_acc": overall, "mean_drop_all": None if overall is None else clean - overall,
        "skipped": [p for p, _ in skipped],
    }
    if adversaries:
        loader = DataLoader(_CorruptedDataset(images, prep, None, 0, seed), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate)
        report["adversarial"] = adversarial_accuracy(predictor.task, loader, adversaries, mean=prep["mean"], std=prep["std"],
                                                     device=predictor.device, seed=seed)
    report["seconds"] = time.perf_counter() - t0
    out = Path(out_dir) if out_dir else path.parent / f"robust-{split}"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "robustness.json", json.dumps(report, indent=1))
    if results:
        save_robustness_plot(report, out / "robustness.png")
    report["out_dir"] = str(out)
    return report


def _corruption_results(predictor, images, names: Sequence[str], severities: Sequence[int], *, seed: int, batch_size: int,
                        workers: int) -> tuple[float, dict[str, dict[str, float]], list]:
    """``(clean top-1, {corruption: {severity: top-1}}, skipped)``, one pass over the images per run."""
    prep = predictor.meta["preprocessing"]

    def accuracy(name: str | None, severity: int) -> tuple[float, list]:
        ds = _CorruptedDataset(images, prep, name, severity, seed)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        with torch.no_grad():
            logits, labels, skipped = predict_loader(predictor.task.predict, loader, device=predictor.device)
        return 100.0 * (logits.argmax(1) == labels).float().mean().item(), skipped

    runs = [(n, int(s)) for n in names for s in severities]
    results: dict[str, dict[str, float]] = {n: {} for n in names}
    with progress_bar("robustness", total=len(runs) + 1) as bar:
        clean, skipped = accuracy(None, 0)
        bar.advance(1)
        for n, s in runs:
            results[n][str(s)], _ = accuracy(n, s)
            bar.advance(1)
    return clean, results, skipped


def _attacks(names: Sequence[str], epsilons: Sequence[float], steps: int) -> list[Attack]:
    """One :class:`Attack` per name and epsilon (in 1/255); PGD keeps each image's worst iterate."""
    if names and (not epsilons or any(not 0 < e <= 255 for e in epsilons)):
        raise ValueError(f"--epsilons are in 1/255 of the pixel range and must be in (0, 255], got {list(epsilons)}")
    out = []
    for name in names:
        kwargs = {"steps": steps, "keep_best": True} if name == "pgd" else {}
        out += [make_attack(name, e / 255, **kwargs) for e in epsilons]
    return out


def eps_key(eps: float) -> str:
    """How results name an epsilon: in 1/255, e.g. ``"2"`` or ``"0.5"``."""
    return f"{eps * 255:.4g}"


def adversarial_accuracy(task, loader, attacks: Sequence[Attack], *, mean: Sequence[float], std: Sequence[float],
                         device: torch.device, seed: int = 0) -> dict:
    """Top-1 of ``task`` on ``loader``'s (normalised) images, clean and under each of ``attacks``.

    Each attack is untargeted against the true label on the cross-entropy of ``task.infer``, in
    fp32 with the task in eval mode. Random starts draw from a generator seeded with ``seed`` and
    the batch index, so the numbers repeat.

    Returns:
        ``{"clean", "n", "results": {attack: {eps in 1/255: top-1 %}}, "settings": {attack: {steps,
        step_size (per eps, pixel units), random_start, keep_best, seed, ...}}}``.
    """
    correct = {(a.name, eps_key(a.eps)): 0 for a in attacks}
    clean = seen = 0
    gen = torch.Generator(device=device)
    for b, batch in enumerate(loader):
        if batch["image"] is None:
            continue
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with torch.no_grad():
            clean += (task.infer(images).argmax(1) == labels).sum().item()
        for a in attacks:
            gen.manual_seed(seed * 1_000_003 + b)
            adv = adversarial_images(task, images, labels, a, mean=mean, std=std, generator=gen)
            with torch.no_grad():
                correct[a.name, eps_key(a.eps)] += (task.infer(adv).argmax(1) == labels).sum().item()
        seen += len(labels)
    results: dict[str, dict[str, float]] = {}
    for (name, key), c in correct.items():
        results.setdefault(name, {})[key] = 100.0 * c / max(seen, 1)
    return {"clean": 100.0 * clean / max(seen, 1), "n": seen, "results": results, "settings": _settings(attacks, seed)}


def _settings(attacks: Sequence[Attack], seed: int) -> dict:
    """Per attack name: what was run, with the step size of each epsilon."""
    out: dict[str, dict] = {}
    for a in attacks:
        s = out.setdefault(a.name, {"norm": "linf", "steps": a.steps, "random_start": a.random_start, "keep_best": a.keep_best,
                                    "seed": seed, "epsilons_255": [], "step_size": {}, "step_size_255": {},
                                    "loss": "cross-entropy of Task.infer against the true label (untargeted)",
                                    "space": "eval crop in [0, 1] pixels, before normalisation; clamped to [0, 1]",
                                    "model_mode": "eval"})
        s["epsilons_255"].append(a.eps * 255)
        s["step_size"][eps_key(a.eps)] = a.step_size
        s["step_size_255"][eps_key(a.eps)] = a.step_size * 255
    return out


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
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def print_robustness(report: dict) -> None:
    from rich.table import Table

    if "adversarial" in report:
        adv = report["adversarial"]
        keys = sorted({k for r in adv["results"].values() for k in r}, key=float)
        t = Table(title=f"top-1 under L-inf attacks (eps in 1/255; clean {adv['clean']:.2f})")
        t.add_column("attack")
        for k in keys:
            t.add_column(f"eps {k}", justify="right")
        for name, accs in adv["results"].items():
            t.add_row(f"{name} ({adv['settings'][name]['steps']} steps)", *(f"{accs[k]:.1f}" if k in accs else "" for k in keys))
        console.print(t)
    if not report["results"]:
        return
    t = Table(title=f"clean top-1 {report['clean']:.2f}  |  mean under corruption {report['mean_corruption_acc']:.2f}")
    t.add_column("corruption")
    for s in report["severities"]:
        t.add_column(f"s{s}", justify="right")
    t.add_column("mean drop", justify="right")
    for n, accs in report["results"].items():
        t.add_row(n, *(f"{accs[str(s)]:.1f}" for s in report["severities"]), f"{report['mean_drop'][n]:.1f}")
    console.print(t)

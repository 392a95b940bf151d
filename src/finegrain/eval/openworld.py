"""Fit what a checkpoint needs to answer honestly in the open world, and store it in the checkpoint.

From held-out (validation) images: the temperature (:mod:`.calibration`) and one threshold per
open-set score for a target true-positive rate (:mod:`.openset`); from training images: the kNN
bank of L2-normalised features; from the data set or a CSV: the class taxonomy
(:mod:`.hierarchy`). ``finegrain train`` runs :func:`fit_open_world` on its validation split after
training; ``finegrain calibrate`` runs it on an existing checkpoint (:func:`calibrate_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finegrain import checkpoint as ckpt
from finegrain.data.base import ImageList, open_dataset
from finegrain.data.device import eval_batches
from finegrain.data.transforms import eval_transform
from finegrain.eval.calibration import calibration_summary, fit_temperature
from finegrain.eval.hierarchy import Taxonomy, taxonomy_of
from finegrain.eval.openset import BANK_KEY, all_scores, fit_thresholds
from finegrain.tasks import require_classifier
from finegrain.utils import console, progress_bar


def collect(task, images: ImageList, prep: dict, *, device: torch.device, batch_size: int = 64, workers: int = 0,
            what: str = "images") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, C], features [N, D], labels [N])`` of the readable ``images`` under the eval transform."""
    from finegrain.predict import logits_and_features

    transform = eval_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"],
                               interpolation=prep["interpolation"])
    loader = eval_batches(images, prep, device, pipeline="cpu", transform=transform, batch_size=batch_size, workers=workers)
    both = logits_and_features(task)
    task.eval()
    logits, feats, labels = [], [], []
    with torch.no_grad(), progress_bar(f"features of {what}", total=len(images)) as bar:
        for batch in loader:
            if batch["image"] is None:
                continue
            out, feat = both(batch["image"].to(device))
            logits.append(out.cpu())
            feats.append(feat.cpu())
            labels.append(batch["label"])
            bar.advance(len(batch["label"]))
    if not logits:
        raise ValueError(f"none of the {len(images)} {what} could be read")
    return torch.cat(logits), torch.cat(feats), torch.cat(labels)


def _bank(task, train: ImageList | None, prep: dict, *, size: int, seed: int, device, batch_size: int, workers: int):
    if train is None or size <= 0 or not len(train):
        return None
    pick = sorted(random.Random(seed).sample(range(len(train)), min(size, len(train))))
    _, feats, _ = collect(task, train.subset(pick), prep, device=device, batch_size=batch_size, workers=workers,
                          what=f"{len(pick)} training images (kNN bank)")
    return F.normalize(feats, dim=1).half()


def fit_open_world(task, meta: ckpt.CheckpointMeta, *, val: ImageList, train: ImageList | None = None,
                   taxonomy: Taxonomy | None = None, device: torch.device | str = "cpu", tpr: float = 0.95,
                   bank_size: int = 2000, k: int = 50, seed: int = 0, batch_size: int = 64, workers: int = 0,
                   fitted_on: str = "validation split") -> tuple[ckpt.CheckpointMeta, dict[str, torch.Tensor]]:
    """The checkpoint metadata with ``calibration``, ``openset`` (and ``hierarchy``) filled in, and the extra tensors.

    Args:
        task: a classifier task (few-shot tasks are refused).
        meta: its checkpoint metadata.
        val: held-out images of the model's classes (labels index ``meta.classes``).
        train: training images, for the kNN bank (none: no ``knn`` score).
        taxonomy: the class hierarchy to store (None keeps the checkpoint's).
        tpr: each score's threshold keeps this fraction of ``val`` as known.
        bank_size, k: how many training features the bank holds, and the k of the kNN score.
    """
    require_classifier(task, "calibration and open-set fitting")
    device = torch.device(device)
    prep = meta.preprocessing
    logits, feats, labels = collect(task, val, prep, device=device, batch_size=batch_size, workers=workers,
                                    what=f"{len(val)} validation images")
    temperature = fit_temperature(logits, labels)
    calibration = {**calibration_summary(logits, labels, temperature), "fitted_on": fitted_on}
    bank = _bank(task, train, prep, size=bank_size, seed=seed, device=device, batch_size=batch_size, workers=workers)
    scores = all_scores(logits, feats, bank, temperature=temperature, k=k)
    openset = {"tpr": tpr, "k": k, "thresholds": fit_thresholds(scores, tpr), "bank_size": 0 if bank is None else len(bank),
               "fitted_on": fitted_on, "n": int(labels.numel())}
    hierarchy = taxonomy.to_dict() if taxonomy is not None else meta.hierarchy
    console.print(f"calibration: temperature {temperature:.3f}, ECE {100 * calibration['ece_before']:.2f}% -> "
                  f"{100 * calibration['ece_after']:.2f}% on {labels.numel()} {fitted_on} images")
    new = dataclasses.replace(meta, calibration=calibration, openset=openset, hierarchy=hierarchy)
    return new, ({BANK_KEY: bank} if bank is not None else {})


def write_open_world(path: str | Path, meta: ckpt.CheckpointMeta, extra: dict[str, torch.Tensor], *,
                     source: str | Path | None = None) -> Path:
    """Rewrite a checkpoint (atomically) with ``meta`` and the extra tensors; the weights are copied unchanged."""
    sd, _ = ckpt.load(source or path)
    return ckpt.save(path, {**sd, **extra}, meta)


def _held_out(checkpoint: Path, data: str, split: str, dataset: str | None, classes: list[str]):
    """``(held-out images, training images or None, what they are)`` for :func:`calibrate_checkpoint`."""
    from finegrain.data.split import load_run_split

    if split == "val":
        images, train_idx, val_idx = load_run_split(checkpoint.parent, data, dataset,
                                                    otherwise="give --split train with a held-out folder as --data instead")
        images = images.relabel(classes)
        return images.subset(val_idx), images.subset(train_idx), "validation split"
    images = open_dataset(data, split, dataset=dataset).relabel(classes)
    if split == "test":
        console.print("[yellow]fitting on the test split: test metrics of this checkpoint are no longer held out")
    return images, None, f"{split} split of {data}"


def calibrate_checkpoint(checkpoint: str | Path, data: str, *, split: str = "val", dataset: str | None = None,
                         out: str | Path | None = None, hierarchy: str | Path | None = None, device: str = "auto",
                         tpr: float = 0.95, bank_size: int = 2000, k: int = 50, batch_size: int = 64,
                         workers: int = 0) -> dict[str, Any]:
    """Fit temperature, open-set thresholds and the kNN bank for an existing checkpoint, and write it (in place by
    default). Returns the stored ``calibration``, ``openset`` and ``hierarchy`` and where they went."""
    from finegrain.utils import resolve_device

    path = ckpt.resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    task, meta = ckpt.load_task(path, dev)
    require_classifier(task, "finegrain calibrate")
    val, train, what = _held_out(path, data, split, dataset, list(meta.classes))
    taxonomy = Taxonomy.from_csv(hierarchy) if hierarchy else taxonomy_of(val)
    if taxonomy is not None:
        taxonomy.check_classes(list(meta.classes), str(hierarchy or data))
    new, extra = fit_open_world(task, meta, val=val, train=train, taxonomy=taxonomy, device=dev, tpr=tpr, bank_size=bank_size,
                                k=k, batch_size=batch_size, workers=workers, fitted_on=what)
    target = Path(out) if out else path
    write_open_world(target, new, extra, source=path)
    return {"checkpoint": str(target), "calibration": new.calibration, "openset": new.openset, "hierarchy": new.hierarchy}


def _unknown_images(folder: str | Path) -> ImageList:
    from finegrain.predict import expand_images

    files = [str(p) for p in expand_images([folder])]
    if not Path(folder).exists() or not files:
        raise FileNotFoundError(f"--unknown {folder}: no images there (a folder of images of classes the model was not trained on)")
    return ImageList(files, [0] * len(files), ["unknown"], source=f"unknown:{folder}")


def open_world_metrics(predictor, logits: torch.Tensor, feats: torch.Tensor | None, labels: torch.Tensor, *,
                       unknown: str | Path | None = None, rollup: float | None = None, batch_size: int = 64,
                       workers: int = 0) -> dict[str, Any]:
    """Calibration (when the checkpoint has a temperature), hierarchy metrics (when it has a taxonomy) and, with
    ``unknown`` (a folder of images of other classes), open-set AUROC / FPR@95 per score and known-class accuracy
    at the stored thresholds. ``logits`` are the raw (unscaled) logits of the known test images."""
    from finegrain.eval.metrics import reliability_bins
    from finegrain.eval.openset import evaluate_openset

    meta, t = predictor.meta, predictor.temperature
    out: dict[str, Any] = {}
    if meta.calibration:
        out["calibration"] = {**calibration_summary(logits, labels, t),
                              "reliability_before": reliability_bins(logits.softmax(1), labels),
                              "reliability_after": reliability_bins((logits / t).softmax(1), labels)}
    if predictor.taxonomy is not None:
        from finegrain.eval.hierarchy import hierarchy_metrics

        out["hierarchy"] = hierarchy_metrics(logits, labels, predictor.classes, predictor.taxonomy, rollup_threshold=rollup)
    if unknown is not None:
        openset = meta.openset or {}
        u_logits, u_feats, _ = collect(predictor.task, _unknown_images(unknown), meta.preprocessing, device=predictor.device,
                                       batch_size=batch_size, workers=workers, what="unknown images")
        k = openset.get("k", 50)
        known = all_scores(logits, feats, predictor.bank, temperature=t, k=k)
        other = all_scores(u_logits, u_feats, predictor.bank, temperature=t, k=k)
        correct = logits.argmax(1) == labels
        out["openset"] = {"unknown": str(unknown), "n_known": int(labels.numel()), "n_unknown": int(u_logits.shape[0]),
                          "tpr": openset.get("tpr", 0.95), "thresholds_from": openset.get("fitted_on", "none stored"),
                          "scores": evaluate_openset(known, other, correct, openset.get("thresholds", {}), openset.get("tpr", 0.95))}
    return out

"""Which epoch to keep: the checkpoint-selection rules compared on the validation split alone.

Input: run folders of ``accuracy.py --keep-epochs`` (every epoch's weights in ``RUN/epochs/``, the
run's ``split.json``). Each epoch is scored on the run's validation images, image by image. Then,
many times over, the validation images are cut in two random halves: each rule (``best``: the
highest top-1; ``last``; ``1se``: the latest epoch within one standard error of the highest) picks
an epoch on half A, and the pick is scored on half B, which it has not seen. The rule whose picks
score higher on B is the better rule, and the test split is never read. With ``--test``, the epoch
each rule picks on the whole validation split is also scored on test (after the choice is made).

A run without ``epochs/`` (an ordinary ``accuracy.py`` run) gets only the picks on its logged val curve,
and with ``--test`` the test top-1 of those picks whose weights it kept (``best`` or ``last``).

The ± of "B - best" is over the halvings of one validation split: it says the mean is settled,
not that another run or data set would agree.

Usage: python benchmarks/selection.py /tmp/finegrain-bench-runs/finegrain-seed1-XXXX [--halves 2000] [--test]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
from pathlib import Path

import torch

from _common import SHARED, print_table, write_results
from finegrain import checkpoint as ckpt
from finegrain.data.device import eval_batches
from finegrain.data.split import open_run_split
from finegrain.eval.evaluate import eval_images
from finegrain.predict import Predictor
from finegrain.train.logger import read_rows
from finegrain.train.loop import predict_loader
from finegrain.train.run import top1_standard_error

DATA = SHARED / "cub50"
RULES = ("best", "last", "1se")


def pick(acc: list[float], rule: str, n: int) -> int:
    """The 0-based epoch ``rule`` keeps from the top-1 curve ``acc`` (percent) measured on ``n`` images."""
    if rule == "last":
        return len(acc) - 1
    top = max(acc)
    if rule == "best":
        return acc.index(top)
    se = top1_standard_error(top, {"val_images": n})  # the trainer's own standard error
    return max(i for i, a in enumerate(acc) if a >= top - se)


def correct_per_image(checkpoint: Path, split: str, workers: int) -> torch.Tensor:
    """``[images]`` bool: whether ``checkpoint`` (``RUN/epochs/epoch-NN.safetensors``) classifies each image of ``split``."""
    return correct_per_image_at(checkpoint, split, workers, run_dir=checkpoint.parent.parent)


@functools.cache  # rules that pick the same epoch score it once
def correct_per_image_at(checkpoint: Path, split: str, workers: int, run_dir: Path | None = None) -> torch.Tensor:
    """``[images]`` bool for ``checkpoint`` of the run in ``run_dir`` (default: its folder); fp32, the eval transform."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    images, _ = eval_images(open_run_split(run_dir or checkpoint.parent, DATA, split), predictor.classes, DATA)
    loader = eval_batches(images, predictor.meta["preprocessing"], predictor.device, pipeline="cpu",
                          transform=predictor.transform, batch_size=64, workers=workers)
    logits, labels, _ = predict_loader(predictor.task.predict, loader, device=predictor.device, channels_last=True)
    return logits.argmax(1) == labels


def split_halves(correct: torch.Tensor, halves: int, seed: int = 0) -> dict[str, list[float]]:
    """``{rule: [top-1 on half B of the epoch picked on half A, per random halving]}``; ``correct`` is ``[epochs, images]``."""
    g = torch.Generator().manual_seed(seed)
    n = correct.shape[1]
    out = {r: [] for r in RULES}
    for _ in range(halves):
        perm = torch.randperm(n, generator=g)
        a, b = perm[: n // 2], perm[n // 2:]
        acc_a = (100 * correct[:, a].double().mean(1)).tolist()
        acc_b = 100 * correct[:, b].double().mean(1)
        for r in RULES:
            out[r].append(acc_b[pick(acc_a, r, len(a))].item())
    return out


def analyse(run: Path, halves: int, workers: int, test: bool) -> dict:
    epochs = sorted((run / "epochs").glob("epoch-*.safetensors"))
    if not epochs:
        return analyse_curve(run, workers, test)
    correct = torch.stack([correct_per_image(e, "val", workers) for e in epochs])
    n = correct.shape[1]
    curve = (100 * correct.double().mean(1)).tolist()
    b = split_halves(correct, halves)
    rows = {}
    for r in RULES:
        e = pick(curve, r, n)
        diff = [x - y for x, y in zip(b[r], b["best"])]
        rows[r] = {"epoch_on_full_val": e + 1, "val_top1": curve[e], "half_b_top1_mean": statistics.mean(b[r]),
                   "half_b_minus_best_mean": statistics.mean(diff),
                   "half_b_minus_best_se": statistics.stdev(diff) / math.sqrt(len(diff)) if r != "best" else 0.0,
                   "wins_over_best": sum(d > 0 for d in diff) / len(diff), "losses_to_best": sum(d < 0 for d in diff) / len(diff)}
    if test:  # only after the rule is chosen: the numbers a report quotes
        for r in RULES:
            rows[r]["test_top1"] = 100 * correct_per_image(epochs[rows[r]["epoch_on_full_val"] - 1], "test", workers).double().mean().item()
    return {"run": str(run), "epochs": len(epochs), "val_images": n, "val_curve": curve, "halves": halves, "rules": rows}


def analyse_curve(run: Path, workers: int, test: bool) -> dict:
    """A run without ``epochs/``: each rule picks on the val curve of ``metrics.jsonl``; no halves (they need every
    epoch's per-image answers), and with ``test`` a pick is scored only where its weights were kept (best or last)."""
    rows_ = read_rows(run / "metrics.jsonl")
    curve, n = [r["val_top1"] for r in rows_], len(json.loads((run / "split.json").read_text())["val"])
    kept = {ckpt.read_meta(run / f"{name}.safetensors").epoch: run / f"{name}.safetensors" for name in ("best", "last")}
    rows = {}
    for r in RULES:
        e = pick(curve, r, n) + 1
        rows[r] = {"epoch_on_full_val": e, "val_top1": curve[e - 1]}
        if test and e in kept:
            rows[r]["test_top1"] = 100 * correct_per_image_at(kept[e], "test", workers).double().mean().item()
    return {"run": str(run), "epochs": len(curve), "val_images": n, "val_curve": curve, "halves": 0, "rules": rows,
            "note": "no epochs/ folder: the rules pick on the training log's val curve (bf16 on CPUs with it); no halves"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--halves", type=int, default=2000, help="random halvings of the validation split")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--test", action="store_true", help="also score each rule's pick (on the whole val split) on test")
    ap.add_argument("--name", default="selection")
    args = ap.parse_args()
    results = [analyse(run, args.halves, args.workers, args.test) for run in args.runs]
    table = [{"run": Path(res["run"]).name, "rule": r, "epoch": v["epoch_on_full_val"], "val top-1": f"{v['val_top1']:.2f}",
              "half B top-1": f"{v['half_b_top1_mean']:.2f}" if "half_b_top1_mean" in v else "-",
              "B - best": f"{v['half_b_minus_best_mean']:+.2f} ± {v['half_b_minus_best_se']:.2f}" if "half_b_top1_mean" in v else "-",
              "wins/losses vs best": f"{v['wins_over_best']:.2f}/{v['losses_to_best']:.2f}" if "half_b_top1_mean" in v else "-",
              "test top-1": f"{v['test_top1']:.2f}" if "test_top1" in v else "-"}
             for res in results for r, v in res["rules"].items()]
    print_table(table, list(table[0]))
    path = write_results(args.name, {"data": "cub50, the run's own validation split (split.json); test only with --test",
                                     "method": "random halves of val: pick on A, score on B", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

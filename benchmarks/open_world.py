"""Open-set rejection, calibration and hierarchical answers on real birds (issue 15).

    python benchmarks/open_world.py --epochs 3          # the CPU budget (about 10 minutes on 2 cores)

- Known / unknown: of cub50's 50 species, every third (16) is held out as *unknown*; the model is
  trained (finegrain's default recipe, EfficientNet-Lite0 with the shared ImageNet weights, 224 px)
  on the other 34 species' train images. Near-OOD: the 16 held-out species' test images; far-OOD:
  flowers12's test images.
- Open set: AUROC and FPR at 95% TPR of each score (msp, energy, max_logit, knn), and the known-class
  accuracy at the thresholds that training fitted on its validation split (95% TPR).
- Calibration: ECE (15 bins) and NLL on the known species' test images before and after the
  temperature fitted on the validation split.
- Hierarchy: species -> the family word of the common name ("Black_footed_Albatross" ->
  "Albatross"), given as a class,parent CSV; top-1 per level, mistake severity, and the roll-up
  answers at a 0.5 threshold.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit, open_dataset

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
CUB = SHARED / "cub50"
FLOWERS = SHARED / "flowers12" / "test"


def species(name: str) -> str:
    return name.split(".", 1)[-1]


def family(name: str) -> str:
    return species(name).split("_")[-1]


def build_data(tmp: Path) -> tuple[Path, Path, Path, list[str], list[str]]:
    """``(known CSV, near-OOD folder of links, hierarchy CSV, known species, unknown species)``."""
    train, test = open_dataset(CUB, "train"), open_dataset(CUB, "test")
    unknown = {c for i, c in enumerate(train.classes) if i % 3 == 2}
    known = [c for c in train.classes if c not in unknown]
    rows = [(p, species(train.classes[label]), split) for split, images in (("train", train), ("test", test))
            for p, label in zip(images.paths, images.labels) if images.classes[label] not in unknown]
    known_csv = tmp / "known.csv"
    with open(known_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    near = tmp / "unknown_species"
    near.mkdir()
    for p, label in zip(test.paths, test.labels):
        if test.classes[label] in unknown:
            (near / f"{species(test.classes[label])}_{Path(p).name}").symlink_to(p)
    tree = tmp / "families.csv"
    tree.write_text("class,parent\n" + "".join(f"{species(c)},{family(c)}\n" for c in known))
    return known_csv, near, tree, known, sorted(unknown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--name", default="open-world")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        known_csv, near, tree, known, unknown = build_data(tmp)
        cfg = RunConfig(DataConfig(data=str(known_csv), img_size=224, batch_size=32, workers=args.workers, hierarchy=str(tree)),
                        ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
                        TrainConfig(epochs=args.epochs, seed=args.seed, out=str(tmp / "runs"), name="open-world"))
        run = fit(cfg)
        m_near = evaluate(run.best_checkpoint, str(known_csv), split="test", workers=args.workers, unknown=near, rollup=0.5)
        m_far = evaluate(run.best_checkpoint, str(known_csv), split="test", workers=args.workers, unknown=FLOWERS)
    rows = [{"score": s, "near_auroc": 100 * m_near["openset"]["scores"][s]["auroc"],
             "near_fpr95": 100 * m_near["openset"]["scores"][s]["fpr_at_95tpr"],
             "far_auroc": 100 * m_far["openset"]["scores"][s]["auroc"],
             "far_fpr95": 100 * m_far["openset"]["scores"][s]["fpr_at_95tpr"],
             "known_acc_at_threshold": 100 * m_near["openset"]["scores"][s]["known_accuracy_at_threshold"]}
            for s in m_near["openset"]["scores"]]
    print_table(rows, list(rows[0]))
    cal, h = m_near["calibration"], m_near["hierarchy"]
    print(f"closed-set top-1 on the {len(known)} known species: {m_near['top1']:.2f}")
    print(f"calibration on known test images: T {cal['temperature']:.3f}, ECE {100 * cal['ece_before']:.2f}% -> "
          f"{100 * cal['ece_after']:.2f}%, NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}")
    print(f"hierarchy: top-1 per level {h['level_accuracy']}, mistake severity {h['mistake_severity']:.2f}; roll-up at 0.5: "
          f"{100 * h['rollup']['rolled_up']:.1f}% rolled up, answers correct {h['rollup']['correct']:.2f}%")
    payload = {
        "data": f"cub50: {len(known)} known species (train), {len(unknown)} held-out species as near-OOD (their test images), "
                "flowers12 test as far-OOD", "backbone": "efficientnet_lite0 (ImageNet-1k weights)", "img_size": 224,
        "epochs": args.epochs, "seed": args.seed, "budget": f"{args.epochs} epochs on this machine",
        "closed_set_top1": m_near["top1"], "openset": rows, "thresholds_from": m_near["openset"]["thresholds_from"],
        "calibration": {k: cal[k] for k in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after", "n")},
        "hierarchy": {k: h[k] for k in ("level_accuracy", "mistake_severity", "mean_severity_all", "rollup")},
        "unknown_species": unknown, "seconds": time.perf_counter() - t0,
    }
    print(f"wrote {write_results(args.name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Few-shot on cub50's novel classes: frozen ImageNet features against methods trained on the base classes.

The classes of cub50 are split the CUB way, by class-id order (``--split-method ordered``):
base = the first 20 (trained on), val = the next 10 (unused here), novel = the last 20 (ids 31-50;
never trained on). Every image of a novel class (train and test) is in the pool that 5-way
episodes are drawn from, 15 queries per class; 1- and 5-shot accuracy with 95% intervals over
``--episodes`` seeded episodes, the same episodes for every row. The backbone is
EfficientNet-Lite0 with the ImageNet weights from ../shared/data at 224 px (timm's preprocessing
of the model: ImageNet mean/std, bicubic, crop 0.875), in every row.

- frozen: the pretrained backbone as it is, with each method's few-shot head (``evaluate_fewshot
  --backbone``). RelationNet has no frozen row: its relation module is learned.
- trained: ``fit_episodic`` on the base classes, then ``evaluate_fewshot`` of its checkpoint.
  ProtoNet (Snell et al. 2017) and RelationNet (Sung et al. 2018) train on 5-way 5-shot episodes
  with 15 queries; Baseline and Baseline++ (Chen et al., arXiv:1904.04232) train a linear / cosine
  classifier of the 20 base classes on ordinary batches of 32. Each method sees about the same
  number of base-class images per epoch (episodes per epoch = base images / 100). AdamW, lr 1e-3
  for new layers and 1e-4 for the pretrained backbone, cosine decay, last epoch kept.

- MAML (Finn et al. 2017) adapts the whole network for 10 SGD steps (lr 0.01) on each test
  episode's support images, BatchNorm on the episode's own statistics; its frozen row adapts the
  ImageNet backbone with a new 5-way head, its trained row starts from the weights and head that
  first-order MAML (5 inner steps; Finn et al.'s FOMAML, since one second-order episode through
  Lite0 at 224 px took 2 minutes and 23 GB here) learned on the base classes. Adapting costs
  15-25 s per test episode on a 2-core CPU, so it runs on fewer episodes into its own file (``--name``).

Usage: python benchmarks/fewshot.py [--epochs 1] [--episodes 600] [--norm half]
       python benchmarks/fewshot.py --methods relationnet --update   (re-run one method; the other rows are
           kept from the results file when its data, budget and normalisation are the same)
       python benchmarks/fewshot.py --methods maml --episodes 100 --name fewshot-maml
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from _common import RESULTS, SHARED, machine_name, print_table, write_results
from finegrain.fewshot.run import evaluate_fewshot, fit_episodic, open_all_images
from finegrain.fewshot.sampler import split_classes

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "cub50"
SPLIT = {"split_method": "ordered", "split_fractions": (0.4, 0.2, 0.4)}
METHODS = {  # row name -> (method, its options, has a frozen row)
    "protonet": ("protonet", {}, True),
    "relationnet": ("relationnet", {}, False),
    "baseline": ("baseline", {"head": "linear"}, True),
    "baseline++": ("baseline", {"head": "cosine"}, True),
    "maml": ("maml", {"first_order": True}, True),  # second order through Lite0 at 224 px peaked at 23 GB here
}
NORMS = {"timm": (None, None), "half": ((0.5,) * 3, (0.5,) * 3)}  # the model's pretrained config; mean = std = 0.5


def frozen(name: str, args) -> list[dict]:
    method, options, _ = METHODS[name]
    r = evaluate_fewshot(DATA, backbone="efficientnet_lite0", pretrained=str(WEIGHTS), method=method, method_args=options,
                         split="novel", k_shots=(1, 5), episodes=args.episodes, img_size=args.img_size, device="cpu",
                         mean=NORMS[args.norm][0], std=NORMS[args.norm][1], **SPLIT)
    return [{"method": name, "init": "frozen ImageNet", **_row(x)} for x in r["results"]]


def trained(name: str, args, tmp: str, base_images: int) -> list[dict]:
    method, options, _ = METHODS[name]
    t0 = time.perf_counter()
    run = fit_episodic(DATA, out=f"{tmp}/{name}", method=method, backbone="efficientnet_lite0", pretrained=str(WEIGHTS),
                       n_way=5, k_shot=5, q_query=15, episodes=max(1, base_images // 100), epochs=args.epochs,
                       val_episodes=0, img_size=args.img_size, mean=NORMS[args.norm][0], std=NORMS[args.norm][1],
                       optimizer="adamw", lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05,
                       batch_size=32, method_args=options, device="cpu", **SPLIT)
    train_s = time.perf_counter() - t0
    r = evaluate_fewshot(DATA, checkpoint=run["best_checkpoint"], split="novel", k_shots=(1, 5), episodes=args.episodes,
                         device="cpu")
    return [{"method": name, "init": f"trained on base ({args.epochs} ep)", **_row(x), "train_s": round(train_s)}
            for x in r["results"]]


def _row(r: dict) -> dict:
    return {"shots": r["k_shot"], "acc": r["acc"], "ci95": r["ci95"], "episodes": r["episodes"]}


def _kept_rows(name: str, payload: dict, methods: list[str]) -> list[dict]:
    """The earlier results' rows of the methods not in ``methods``; refused when the setting differs."""
    path = RESULTS / f"{name}-{machine_name()}.json"
    old = json.loads(path.read_text())
    differs = [k for k in ("data", "backbone", "budget") if old.get(k) != payload[k]]
    if differs:
        raise SystemExit(f"--update: {path} has another {', '.join(differs)}; run every method instead")
    return [r for r in old["results"] if r["method"] not in methods]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=1, help="base-class training epochs")
    ap.add_argument("--img-size", type=int, default=224, help="image size of every row (224: the weights' own)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "maml"], choices=tuple(METHODS),
                    help="default: all but maml (seconds per test episode: run it alone with fewer --episodes)")
    ap.add_argument("--norm", default="timm", choices=tuple(NORMS),
                    help="input normalisation: timm (the model's pretrained config: ImageNet mean/std) or half (mean = std = 0.5)")
    ap.add_argument("--name", help="results file name (default: fewshot, or fewshot-norm-NORM)")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of the methods not run from the existing results file (same data, budget, normalisation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = open_all_images(DATA)
    splits = split_classes(images, **{k.removeprefix("split_"): v for k, v in SPLIT.items()})
    base_images = sum(label in set(splits["base"]) for label in images.labels)
    rows: list[dict] = []
    payload = {"data": f"cub50 split by class-id order: base {len(splits['base'])} classes ({base_images} images), "
                       f"val {len(splits['val'])}, novel {len(splits['novel'])} (all their train+test images); "
                       "5-way, 15 queries per class",
               "backbone": f"efficientnet_lite0, ImageNet weights (shared/data/weights), {args.img_size} px, timm preprocessing"
                           + ("" if args.norm == "timm" else " with mean = std = 0.5"),
               "budget": f"{args.episodes} test episodes per row (seed 0, the same for every row); base training "
                         f"{args.epochs} epoch(s), one training seed",
               "results": rows}
    name = args.name or ("fewshot" if args.norm == "timm" else f"fewshot-norm-{args.norm}")
    if args.update:
        rows += _kept_rows(name, payload, args.methods)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            if METHODS[method][2]:
                rows += frozen(method, args)
                write_results(name, payload)
            rows += trained(method, args, tmp, base_images)
            print(rows[-1], flush=True)
            write_results(name, payload)
    rows.sort(key=lambda r: list(METHODS).index(r["method"]))  # kept rows back in method order
    write_results(name, payload)
    print_table([{**r, "acc": f"{r['acc']:.2f} ± {r['ci95']:.2f}"} for r in rows], ["method", "init", "shots", "acc", "episodes"])


if __name__ == "__main__":
    main()

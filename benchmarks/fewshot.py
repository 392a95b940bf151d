"""5-way 1-shot and 5-shot accuracy (+- 95% CI) on the novel classes of cub50.

Novel classes are the last 20 of cub50 (class ids 31-50, never trained on here); all their
images (train and test) form the pool episodes are drawn from, 15 queries per class. The
backbone is EfficientNet-Lite0 with the ImageNet weights from ../shared/data at 224 px
(mean = std = 0.5, as the weights' README advises); no episodic or base-class training happens,
so these numbers measure the pretrained embedding plus each few-shot head:

- protonet: squared Euclidean distance to class-mean prototypes of the embeddings (Snell et al.).
- baseline-linear / baseline-cosine: a linear / cosine classifier fine-tuned on the support
  embeddings, 100 full-batch SGD steps (Chen et al., arXiv:1904.04232).

Embeddings are computed once and reused by every episode.

Usage: python benchmarks/fewshot.py [--episodes 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import SHARED, print_table, write_results
from finegrain.data.transforms import eval_transform
from finegrain.fewshot.evaluate import compute_features, evaluate_episodes
from finegrain.fewshot.run import open_all_images
from finegrain.models.backbone import create_backbone
from finegrain.tasks.fewshot import build_method

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "cub50"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--novel", type=int, default=20, help="the last N classes are the novel classes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    images = open_all_images(DATA)
    novel = list(range(len(images.classes) - args.novel, len(images.classes)))
    subset = images.subset([i for i, l in enumerate(images.labels) if l in set(novel)])
    model = create_backbone("efficientnet_lite0", num_classes=0, pretrained=str(WEIGHTS))
    proto = build_method("protonet", model, n_way=5, k_shot=1)
    t0 = time.perf_counter()
    tf = eval_transform(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875, interpolation="bicubic")
    feats, labels, skipped = compute_features(proto, subset, tf, device=torch.device("cpu"), workers=args.workers)
    embed_s = time.perf_counter() - t0
    print(f"embedded {len(labels)} images of {len(novel)} novel classes in {embed_s:.0f}s")

    methods = {
        "protonet": proto,
        "baseline-linear": build_method("baseline", model, n_way=5, k_shot=1, head="linear"),
        "baseline-cosine": build_method("baseline", model, n_way=5, k_shot=1, head="cosine"),
    }
    rows = []
    for name, task in methods.items():
        for k in (1, 5):
            t1 = time.perf_counter()
            r = evaluate_episodes(task, feats, labels, n_way=5, k_shot=k, q_query=15, episodes=args.episodes, classes=novel,
                                  class_names=images.classes, seed=0)
            rows.append({"method": name, "shots": k, "acc": r["acc"], "ci95": r["ci95"], "episodes": args.episodes,
                         "seconds": time.perf_counter() - t1})
    print_table(rows, ["method", "shots", "acc", "ci95", "episodes", "seconds"])
    path = write_results("fewshot", {
        "data": "cub50, novel = last 20 classes (all train+test images), 5-way, 15 queries per class",
        "backbone": "efficientnet_lite0, ImageNet weights (shared/data/weights), 224 px, mean=std=0.5, no base-class training",
        "budget": f"{args.episodes} episodes per (method, shots), seed 0; embeddings computed once ({embed_s:.0f}s, "
                  f"{args.threads} torch thread(s))",
        "images": int(labels.numel()), "skipped": len(skipped), "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

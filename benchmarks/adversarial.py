"""Clean vs adversarial fine-tuning on flowers12 (EfficientNet-Lite0, ImageNet weights), then top-1 under FGSM/PGD.

Each recipe fine-tunes from the same weights with ``fit`` (same default recipe, seed and split; the
adversarial one adds ``--adv-attack pgd``: Madry et al., arXiv:1706.06083, mixed half and half into
each batch as Goodfellow et al., arXiv:1412.6572), then ``robustness_eval`` measures test top-1
clean and under L-inf FGSM and PGD (10 steps of 2.5 eps / 10, random start, worst iterate kept) at
each epsilon, in 1/255 of the pixel range. The budget is tiny (1 epoch on a shared 2-core CPU):
it checks that adversarial training runs end to end on real data, what it costs, and which way it
moves clean and robust accuracy; it is not a robustness claim.

Usage: python benchmarks/adversarial.py --epochs 1 --epsilons 2 [--train-steps 3] [--limit 120]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, fit
from finegrain.eval.robustness import robustness_eval
from finegrain.train.logger import read_rows

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "flowers12"


def _recipes(args) -> dict[str, dict]:
    """Recipe name -> the TrainConfig fields it sets beyond the default recipe."""
    return {"clean": {}, f"pgd{args.train_steps}-eps{args.train_eps:g}": {
        "adv_attack": "pgd", "adv_eps": args.train_eps, "adv_steps": args.train_steps, "adv_ratio": args.train_ratio}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-eps", type=float, default=2.0, help="training radius in 1/255")
    ap.add_argument("--train-steps", type=int, default=3, help="PGD steps while training")
    ap.add_argument("--train-ratio", type=float, default=0.5, help="fraction of each batch made adversarial")
    ap.add_argument("--epsilons", nargs="+", type=float, default=[2.0], help="evaluation radii in 1/255")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    payload = {"budget": vars(args), "backbone": "efficientnet_lite0 (in1k weights)", "data": "flowers12 (720 train / 240 test)",
               "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for name, adv in _recipes(args).items():
            cfg = RunConfig(
                DataConfig(data=str(DATA), img_size=args.img_size, batch_size=args.batch_size, workers=1, val_fraction=0.0,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
                TrainConfig(epochs=args.epochs, device="cpu", out=tmp, name=name, seed=0, **adv),
            )
            t0 = time.perf_counter()
            result = fit(cfg)
            train_s = time.perf_counter() - t0
            epochs = read_rows(result.run_dir / "metrics.jsonl")
            r = robustness_eval(result.best_checkpoint, DATA, split="test", corruptions=[], attacks=["fgsm", "pgd"],
                                epsilons=args.epsilons, attack_steps=args.attack_steps, limit=args.limit, workers=1,
                                device="cpu", out_dir=f"{tmp}/{name}-robust")
            a = r["adversarial"]
            row = {"recipe": name, "train": adv or "default recipe", "clean_top1": a["clean"], "n_test": a["n"],
                   "train_s": round(train_s, 1), "train_img_s": round(epochs[-1]["images_per_s"], 2),
                   "eval_s": round(r["seconds"], 1), "settings": a["settings"]}
            for attack, accs in a["results"].items():
                row.update({f"{attack}_{eps}": acc for eps, acc in accs.items()})
            rows.append(row)
            print({k: v for k, v in row.items() if k != "settings"}, flush=True)
            write_results("adversarial", payload)
    columns = ["recipe", "clean_top1"] + [k for k in rows[0] if k.startswith(("fgsm_", "pgd_"))] + ["train_img_s", "train_s", "eval_s"]
    print_table(rows, columns)


if __name__ == "__main__":
    main()

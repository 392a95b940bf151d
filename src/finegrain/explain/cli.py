"""``finegrain explain``, ``finegrain explain-score`` and ``finegrain eval-robust``."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    p = sub.add_parser("explain", help="heatmap overlays of where the model looks (Grad-CAM, Grad-CAM++, rollout)")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--method", default=None, choices=("gradcam", "gradcampp", "rollout"),
                   help="default: rollout for ViTs, gradcam otherwise")
    p.add_argument("--target", default=None, help="class name or index to explain (default: the predicted class)")
    p.add_argument("--out", required=True, help="folder for the PNG overlays and explain.json")
    p.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("explain-score", help="pointing game and energy-in-box of explanations against bounding boxes")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="data set with boxes (CUB with bounding_boxes.txt)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--method", default=None, choices=("gradcam", "gradcampp", "rollout"))
    p.add_argument("--predicted", action="store_true", help="explain the predicted class instead of the true one")
    p.add_argument("--tolerance", type=float, default=0.0, help="pointing-game tolerance in crop pixels")
    p.add_argument("--limit", type=int, default=None, help="score only this many images")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_explain_score)

    p = sub.add_parser("eval-robust", help="accuracy under noise, blur, JPEG, brightness, contrast, occlusion, rotation, "
                                           "and FGSM/PGD attacks")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--corruptions", nargs="+", default=None, help="names (default: all; none: no corruptions)")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--attacks", nargs="+", default=[], metavar="ATTACK",
                   help="L-inf attacks to run: fgsm, pgd, fast (default: none); settings are written to the results")
    p.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4], help="attack radii in 1/255 of the pixel range")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps (step size 2.5 eps / steps)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: robust-SPLIT beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_eval_robust)


def _resolve_target(target: str | None, classes: list[str]) -> int | None:
    if target is None:
        return None
    if target in classes:
        return classes.index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(classes):
        return int(target)
    raise ValueError(f"--target {target!r} is neither a class name nor an index in 0..{len(classes) - 1}; "
                     f"classes include {classes[:5]}")


def _cmd_explain(args) -> int:
    from pathlib import Path

    from finegrain.checkpoint import resolve_checkpoint, write_text_atomic
    from finegrain.explain.cam import save_overlays
    from finegrain.predict import Predictor, expand_images

    predictor = Predictor.from_checkpoint(resolve_checkpoint(args.checkpoint), device=args.device)
    paths = expand_images(args.images)
    if not paths:
        raise FileNotFoundError(f"no images found in {args.images}")
    records = save_overlays(predictor, paths, args.out, method=args.method,
                            target=_resolve_target(args.target, predictor.classes), alpha=args.alpha)
    write_text_atomic(Path(args.out) / "explain.json", json.dumps(records, indent=1))
    print(json.dumps(records, indent=1))
    return 1 if all("error" in r for r in records) else 0


def _cmd_explain_score(args) -> int:
    from finegrain.checkpoint import resolve_checkpoint, write_text_atomic
    from finegrain.data.base import open_dataset
    from finegrain.explain.score import localization_scores
    from finegrain.predict import Predictor

    predictor = Predictor.from_checkpoint(resolve_checkpoint(args.checkpoint), device=args.device)
    images = open_dataset(args.data, args.split, dataset=args.dataset)
    report = localization_scores(predictor, images, method=args.method, use_label=not args.predicted,
                                 tolerance=args.tolerance, limit=args.limit)
    text = json.dumps(report, indent=1)
    if args.out:
        write_text_atomic(args.out, text)
    print(text)
    return 0


def _cmd_eval_robust(args) -> int:
    from finegrain.eval.robustness import print_robustness, robustness_eval

    corruptions = [] if args.corruptions == ["none"] else args.corruptions
    r = robustness_eval(args.checkpoint, args.data, split=args.split, dataset=args.dataset, corruptions=corruptions,
                        severities=args.severities, attacks=args.attacks, epsilons=args.epsilons,
                        attack_steps=args.attack_steps, limit=args.limit, seed=args.seed, out_dir=args.out,
                        batch_size=args.batch_size, workers=args.workers, device=args.device)
    print_robustness(r)
    print(f"results written to {r['out_dir']}")
    return 0

"""``finegrain fewshot train|eval``, ``finegrain enroll`` and ``finegrain unenroll``."""

from __future__ import annotations

import argparse
import json

from finegrain.fewshot.sampler import SPLIT_METHODS


def _method_args(args) -> dict:
    """The chosen method's options from its flags (a flag of another method is refused)."""
    from finegrain.cli import given_options
    from finegrain.config import options_from_flags
    from finegrain.tasks.fewshot import fewshot_method

    return options_from_flags(fewshot_method(args.method or "protonet").name, given_options(args))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, CSV or benchmark root (train and test images are pooled; splits are by class)")
    p.add_argument("--dataset", default=None, help="reader name; guessed from --data if unset")
    p.add_argument("--n-way", type=int, default=5, help="classes per episode (default: 5)")
    p.add_argument("--q-query", type=int, default=15, help="query images per class per episode (default: 15)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: 84 for training, the checkpoint's or backbone's for eval)")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation mean (default: the backbone's pretrained config; eval of a checkpoint: its own)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation std (default: the backbone's pretrained config; eval of a checkpoint: its own)")
    p.add_argument("--split-method", default="auto", choices=SPLIT_METHODS,
                   help="class split: CUB-200 100/50/50 by class id, ordered (by class id) or random by --split-fractions "
                        "(auto: cub for CUB-200, else random)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("BASE", "VAL", "NOVEL"),
                   help="class fractions of the ordered or random split (default: 0.6 0.2 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the random class split")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes")
    p.add_argument("--workers", type=int, default=0, help="data loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    from finegrain.cli import add_option_flags

    add_option_flags(p, trainer="episodic")  # the methods' own options (--relation, --inner-steps, --head, ...)


def _cmd_train(args) -> int:
    from finegrain.fewshot.run import fit_episodic

    result = fit_episodic(
        args.data, out=args.out, method=args.method, backbone=args.backbone, pretrained=args.pretrained,
        dataset=args.dataset, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query, episodes=args.episodes,
        epochs=args.epochs, val_episodes=args.val_episodes, img_size=args.img_size or 84, mean=args.mean, std=args.std, optimizer=args.optimizer,
        lr=args.lr, backbone_lr_mult=args.backbone_lr_mult, split_method=args.split_method,
        split_fractions=tuple(args.split_fractions), split_seed=args.split_seed, seed=args.seed, workers=args.workers,
        device=args.device, batch_size=args.batch_size, method_args=_method_args(args), resume=args.resume,
    )
    print(json.dumps(result, indent=1))
    return 130 if result["interrupted"] else 0


def _cmd_eval(args) -> int:
    from finegrain.fewshot.run import evaluate_fewshot

    result = evaluate_fewshot(
        args.data, checkpoint=args.checkpoint, backbone=args.backbone, pretrained=args.pretrained, method=args.method,
        dataset=args.dataset, split=args.split, n_way=args.n_way, k_shots=args.k_shot, q_query=args.q_query,
        episodes=args.episodes, img_size=args.img_size, mean=args.mean, std=args.std, split_method=args.split_method,
        split_fractions=tuple(args.split_fractions), split_seed=args.split_seed, seed=args.seed, workers=args.workers,
        device=args.device, method_args=_method_args(args) if args.method else None,
    )
    for r in result["results"]:
        print(f"{result['method']} {r['n_way']}-way {r['k_shot']}-shot on {result['split']} classes: "
              f"{r['acc']:.2f} +- {r['ci95']:.2f}% ({r['episodes']} episodes)")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def _cmd_enroll(args) -> int:
    from finegrain.checkpoint import read_meta
    from finegrain.fewshot.enroll import enroll_class, old_class_accuracy

    old_classes = list(read_meta(args.checkpoint)["classes"])
    before = None
    if args.report_data:
        before = old_class_accuracy(args.checkpoint, args.report_data, classes=old_classes, split=args.report_split, device=args.device)
    result = enroll_class(args.checkpoint, args.class_name, args.images, args.out, replace=args.replace,
                          min_images=args.min_images, bias=args.bias, margin_std=args.margin_std, device=args.device)
    for path, err in result["unreadable"]:
        print(f"unreadable: {path}: {err}")
    if before is not None:
        after = old_class_accuracy(result["out"], args.report_data, classes=[c for c in old_classes if c != args.class_name],
                                   split=args.report_split, device=args.device)
        result["old_class_top1"] = {"before": before["top1"], "after": after["top1"], "images": after["images"]}
    print(json.dumps({k: v for k, v in result.items() if k != "unreadable"} | {"unreadable": len(result["unreadable"])}, indent=1))
    return 0


def _cmd_unenroll(args) -> int:
    from finegrain.fewshot.enroll import unenroll_class

    print(json.dumps(unenroll_class(args.checkpoint, args.class_name, args.out), indent=1))
    return 0


def add_commands(sub) -> None:
    """Register ``fewshot train``, ``fewshot eval``, ``enroll`` and ``unenroll``."""
    from finegrain.tasks.fewshot import fewshot_methods

    fs = sub.add_parser("fewshot", help="few-shot learning: episodic training and N-way K-shot evaluation")
    fsub = fs.add_subparsers(dest="fewshot_command", required=True)

    p = fsub.add_parser("train", help="train a few-shot method on episodes of the base classes")
    _add_common(p)
    p.add_argument("--method", default="protonet", choices=sorted(fewshot_methods()),
                   help="protonet, relationnet, maml (episodic), or baseline (a classifier of the base classes)")
    p.add_argument("--batch-size", type=int, default=32, help="baseline: images per step (default: 32)")
    p.add_argument("--backbone", default="conv4", help="timm model name, or conv4 (default: conv4)")
    p.add_argument("--pretrained", default="none", help="'none', 'hub' or a weights file")
    p.add_argument("--k-shot", type=int, default=1, help="support images per class (default: 1)")
    p.add_argument("--episodes", type=int, default=100, help="training episodes per epoch (default: 100)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.add_argument("--val-episodes", type=int, default=100, help="validation episodes per epoch on the val classes (0: none)")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd", "rmsprop"))
    p.add_argument("--lr", type=float, default=1e-3, help="outer learning rate (default: 1e-3)")
    p.add_argument("--backbone-lr-mult", type=float, default=1.0, help="backbone lr multiplier (lower it for pretrained backbones)")
    p.add_argument("--out", required=True, help="run folder for best/last.safetensors and metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same arguments)")
    p.set_defaults(func=_cmd_train)

    p = fsub.add_parser("eval", help="N-way K-shot accuracy +- 95%% CI over seeded episodes")
    _add_common(p)
    p.add_argument("--checkpoint", default=None, help="a fewshot or supervised checkpoint (or run folder)")
    p.add_argument("--backbone", default=None, help="instead of --checkpoint: a timm backbone")
    p.add_argument("--pretrained", default="none", help="weights of --backbone: 'none', 'hub' or a file")
    p.add_argument("--method", default=None, choices=sorted(fewshot_methods()), help="default: the checkpoint's method, else protonet")
    p.add_argument("--split", default="novel", choices=("base", "val", "novel", "all"), help="classes to evaluate on (default: novel)")
    p.add_argument("--k-shot", type=int, nargs="+", default=[1, 5], help="shot counts to evaluate (default: 1 5)")
    p.add_argument("--episodes", type=int, default=600, help="episodes per shot count (default: 600)")
    p.add_argument("--json", action="store_true", help="also print the full result as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("enroll", help="add a class to a trained checkpoint from a few images (weight imprinting)")
    p.add_argument("checkpoint", help="source checkpoint (never modified)")
    p.add_argument("--class", dest="class_name", required=True, help="name of the new class")
    p.add_argument("images", nargs="+", help="image files or folders of the new class")
    p.add_argument("--out", required=True, help="the new checkpoint")
    p.add_argument("--replace", action="store_true", help="re-imprint a class that already exists")
    p.add_argument("--min-images", type=int, default=1, help="readable images needed (default: 1)")
    p.add_argument("--bias", default="calibrated", choices=("calibrated", "mean"),
                   help="new bias: calibrated on the enrollment images (default), or the mean of the old biases")
    p.add_argument("--margin-std", type=float, default=2.0,
                   help="calibrated bias: new-logit margin over the best old logit, in std of the old logits (default: 2)")
    p.add_argument("--report-data", default=None, help="data to report old-class top-1 before and after on")
    p.add_argument("--report-split", default="test", choices=("train", "test"), help="split of --report-data (default: test)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_enroll)

    p = sub.add_parser("unenroll", help="remove a class from a checkpoint")
    p.add_argument("checkpoint", help="source checkpoint (never modified)")
    p.add_argument("--class", dest="class_name", required=True, help="class to remove")
    p.add_argument("--out", required=True, help="the new checkpoint")
    p.set_defaults(func=_cmd_unenroll)

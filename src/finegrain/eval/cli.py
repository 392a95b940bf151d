"""``finegrain eval``."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="metrics of a checkpoint on a split (explicitly: --split test)")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="image folder, CSV or benchmark root")
    p.add_argument("--dataset", default=None, help="reader name; guessed from --data if unset")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="val: the run's own validation images (split.json beside the checkpoint), to choose options without "
                        "touching test")
    p.add_argument("--tta-flip", action="store_true", help="average with the mirrored image (named in the results)")
    p.add_argument("--out", default=None, help="output folder (default: eval-SPLIT beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--corruptions", nargs="*", default=None, metavar="NAME",
                   help="also evaluate under corruptions at severities 1-5 and report the drop (no names: all; "
                        "same as `finegrain eval-robust`)")
    p.add_argument("--pipeline", default="cpu", choices=("cpu", "device"),
                   help="cpu: the checkpoint's exact preprocessing per image; device: decode and crop whole batches on the device")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="forward pass precision: auto = bf16 where training uses it (CUDA, CPUs with native bf16), else "
                        "fp32; recorded in results.json")
    p.add_argument("--unknown", default=None, metavar="DIR",
                   help="a folder of images of classes the model was not trained on: open-set AUROC, FPR at 95%% TPR, "
                        "known-class accuracy at the stored thresholds")
    p.add_argument("--rollup", type=float, default=None, metavar="P",
                   help="with a class hierarchy: also score roll-up answers at this probability threshold")
    p.add_argument("--crop", default=None, choices=("none", "gt", "detected"),
                   help="classify the whole image (none), the data set's bounding-box crop (gt), or the crop of the best box "
                        "of --detector (detected; images where it finds nothing are classified whole and counted). Default: "
                        "the checkpoint's training crop (gt after train --crop box, else none); recorded in results.json")
    p.add_argument("--crop-margin", type=float, default=None, metavar="M",
                   help="enlarge the box by this fraction of its size per side (default: the checkpoint's, else 0.1)")
    p.add_argument("--detector", default=None, metavar="DETECTOR_CKPT",
                   help="detector checkpoint (finegrain detect train) whose top box per image --crop detected uses")
    p.set_defaults(func=_cmd_eval)

    c = sub.add_parser("calibrate", help="fit the temperature, open-set thresholds and kNN bank of a checkpoint "
                                         "(and attach a class hierarchy); written into the checkpoint")
    c.add_argument("checkpoint", help="checkpoint file or run folder")
    c.add_argument("--data", required=True, help="the data set the model was trained on (or a held-out folder with --split train)")
    c.add_argument("--dataset", default=None, help="reader name; guessed from --data if unset")
    c.add_argument("--split", default="val", choices=("val", "train", "test"),
                   help="held-out images to fit on: val (the run's split.json, default), or a split of --data")
    c.add_argument("--hierarchy", default=None, help="CSV of class,parent rows (default: the data set's own taxonomy, if any)")
    c.add_argument("--tpr", type=float, default=0.95, help="each open-set threshold keeps this fraction of known images")
    c.add_argument("--bank-size", type=int, default=2000, help="training images in the kNN bank (0: no kNN score)")
    c.add_argument("--k", type=int, default=50, help="k of the kNN score")
    c.add_argument("--out", default=None, help="write here instead of updating the checkpoint in place")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--device", default="auto")
    c.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    import json

    from finegrain.eval.openworld import calibrate_checkpoint

    r = calibrate_checkpoint(args.checkpoint, args.data, split=args.split, dataset=args.dataset, out=args.out,
                             hierarchy=args.hierarchy, device=args.device, tpr=args.tpr, bank_size=args.bank_size, k=args.k,
                             batch_size=args.batch_size, workers=args.workers)
    print(json.dumps({k: r[k] for k in ("checkpoint", "calibration", "openset")}, indent=1))
    return 0


def _cmd_eval(args) -> int:
    from finegrain.eval.evaluate import evaluate, print_summary

    m = evaluate(args.checkpoint, args.data, split=args.split, dataset=args.dataset, tta_flip=args.tta_flip,
                 out_dir=args.out, batch_size=args.batch_size, workers=args.workers, device=args.device,
                 pipeline=args.pipeline, unknown=args.unknown, rollup=args.rollup, precision=args.precision,
                 crop=args.crop, crop_margin=args.crop_margin, detector=args.detector)
    if "map" in m:  # a detector
        from finegrain.detect.evaluate import print_detection_summary

        print_detection_summary(m)
    else:
        print_summary(m)
    print(f"results written to {m['out_dir']}")
    if args.corruptions is not None:
        from finegrain.eval.robustness import print_robustness, robustness_eval

        r = robustness_eval(args.checkpoint, args.data, split=args.split, dataset=args.dataset,
                            corruptions=args.corruptions or None, batch_size=args.batch_size, workers=args.workers,
                            device=args.device)
        print_robustness(r)
        print(f"robustness results written to {r['out_dir']}")
    return 0

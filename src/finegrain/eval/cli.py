"""``finegrain eval``."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="metrics of a checkpoint on a split (explicitly: --split test)")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="image folder, CSV or benchmark root")
    p.add_argument("--dataset", default=None, help="reader name; guessed from --data if unset")
    p.add_argument("--split", default="test", choices=("train", "test"))
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
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from finegrain.eval.evaluate import evaluate, print_summary

    m = evaluate(args.checkpoint, args.data, split=args.split, dataset=args.dataset, tta_flip=args.tta_flip,
                 out_dir=args.out, batch_size=args.batch_size, workers=args.workers, device=args.device,
                 pipeline=args.pipeline)
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

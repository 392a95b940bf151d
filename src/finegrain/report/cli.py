"""``finegrain report``."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page about a run: curves, errors, calibration, t-SNE, Grad-CAM")
    p.add_argument("run_dir", help="run folder (or a checkpoint inside one)")
    p.add_argument("--data", default=None, help="data set (default: the one the run was trained on)")
    p.add_argument("--dataset", default=None, help="reader name (default: the run's, else guessed from --data)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="split to evaluate; val is the run's held-out validation images (default: test)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report-SPLIT.html)")
    p.add_argument("--method", default=None, choices=("gradcam", "gradcampp", "rollout"),
                   help="explanation method (default: rollout for ViTs, gradcam otherwise)")
    p.add_argument("--examples", type=int, default=6, help="correct and wrong images to explain (each)")
    p.add_argument("--pairs", type=int, default=6, help="most confused class pairs to show with images")
    p.add_argument("--max-points", type=int, default=2000, help="at most this many images in the t-SNE map")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="also save a full-page screenshot (headless Chromium)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from finegrain.report import build_report, screenshot

    out = build_report(args.run_dir, data=args.data, split=args.split, dataset=args.dataset, out=args.out,
                       method=args.method, n_examples=args.examples, n_pairs=args.pairs, max_points=args.max_points,
                       batch_size=args.batch_size, workers=args.workers, device=args.device)
    print(out)
    if args.screenshot:
        print(screenshot(out, args.screenshot))
    return 0

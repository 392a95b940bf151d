"""``finegrain data check``."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="data set tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="unreadable files, duplicates, train/test leaks, tiny images, imbalance (read-only)")
    c.add_argument("--data", required=True, help="image folder, CSV or benchmark root")
    c.add_argument("--dataset", default=None, help="reader name; guessed from --data if unset")
    c.add_argument("--out", required=True, help="folder for report.json and report.md")
    c.add_argument("--write-clean-split", default=None, metavar="FILE",
                   help="also write a path,label,split CSV without the flagged files")
    c.add_argument("--hash-threshold", type=int, default=6, help="max Hamming distance (of 64) for near duplicates")
    c.add_argument("--min-side", type=int, default=64, help="flag images with a shorter side")
    c.add_argument("--max-aspect", type=float, default=4.0, help="flag images with a larger long/short ratio")
    c.set_defaults(func=_cmd_check)


def _cmd_check(args) -> int:
    from finegrain.data.check import check_data
    from finegrain.utils import console

    r = check_data(args.data, dataset=args.dataset, out_dir=args.out, hash_threshold=args.hash_threshold,
                   min_side=args.min_side, max_aspect=args.max_aspect, clean_split=args.write_clean_split)
    s = r["summary"]
    console.print(f"{s['images']} images: {s['unreadable']} unreadable, {s['exact_duplicate_groups']} exact duplicate groups, "
                  f"{s['near_duplicate_pairs']} near-duplicate pairs, {s['leak_groups']} train/test leaks, "
                  f"{s['tiny']} tiny, {s['extreme_aspect']} extreme aspect; imbalance {s['imbalance']}")
    print(f"report written to {r['out_dir']}/report.md")
    if "clean_split" in r:
        print(f"clean split written to {r['clean_split']} ({s['flagged_for_removal']} files left out)")
    return 0

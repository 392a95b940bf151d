"""``finegrain prune``."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    p = sub.add_parser("prune", help="structured channel pruning of a checkpoint, then fine-tuning")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of channels to remove (0-1)")
    p.add_argument("--out", required=True, help="new checkpoint file (the input is never modified)")
    p.add_argument("--data", default=None, help="training images for fine-tuning")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (0: prune only)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune's order and augmentation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune (same arguments)")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args) -> int:
    from finegrain.compress.prune import prune_checkpoint

    s = prune_checkpoint(args.checkpoint, args.out, ratio=args.ratio, data=args.data, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed,
                         resume=args.resume)
    s.pop("history")
    print(json.dumps(s, indent=1))
    return 130 if s.get("interrupted") else 0

"""``finegrain tune``."""

from __future__ import annotations

_EPILOG = """search space rules (repeat --space, one per field; any data/model/train field):
  train.lr=loguniform:1e-4:1e-2      float on a log scale (add :N for N grid points)
  data.scale_min=uniform:0.1:0.5     float (add :N for N grid points)
  train.epochs=int:2:6[:STEP]        integer range, ends included
  model.attention=choice:none,se     listed values (model.attention needs --task fgvc)
The objective is the best validation top-1 (--val-fraction > 0); the test split is never used.
"""


def add_commands(sub) -> None:
    import argparse

    from finegrain.cli import add_run_flags

    p = sub.add_parser("tune", help="hyperparameter search (Optuna) over any training flag, on validation top-1",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", action="append", default=[], metavar="FIELD=KIND:ARGS", help="a searched field (repeat)")
    p.add_argument("--trials", type=int, default=None, help="number of trials (grid: default and at most the grid size)")
    p.add_argument("--search", default="tpe", choices=("tpe", "random", "grid"),
                   help="Optuna sampler: tpe (default), random or grid (--sampler is the training order of data.sampler)")
    p.add_argument("--pruner", default="median", choices=("median", "none"),
                   help="median: stop trials whose validation top-1 trails the median at the same epoch")
    p.add_argument("--prune-startup-trials", type=int, default=2, help="finished trials before any pruning")
    p.add_argument("--prune-warmup-epochs", type=int, default=1, help="epochs of each trial that are never pruned")
    p.add_argument("--study-seed", type=int, default=0, help="sampler seed (--seed stays the trials' training seed)")
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    p.add_argument("--config", help="YAML file with data/model/train sections (the base config); flags override it")
    add_run_flags(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from finegrain.cli import config_from_args
    from finegrain.tune.study import print_study, run_study

    result = run_study(config_from_args(args), args.space, trials=args.trials, sampler=args.search, pruner=args.pruner,
                       prune_startup_trials=args.prune_startup_trials, prune_warmup_epochs=args.prune_warmup_epochs,
                       seed=args.study_seed, timeout=args.timeout)
    print_study(result)
    return 130 if result.interrupted else 0

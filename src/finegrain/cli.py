"""``finegrain <command>``: each command parses flags and calls one public function.

Training flags are generated from the config dataclasses (``finegrain.config``), so their help
text lives in one place. Other packages add commands through an ``add_commands(subparsers)``
function in the modules listed in ``_COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from pathlib import Path

from finegrain.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    cli_fields,
    option_flags,
    options_from_flags,
    task_choice,
)

_COMMAND_MODULES = (
    "finegrain.demo",
    "finegrain.eval.cli",
    "finegrain.explain.cli",
    "finegrain.deploy.cli",
    "finegrain.serve.cli",
    "finegrain.fewshot.cli",
    "finegrain.data.cli",
    "finegrain.compress.cli",
    "finegrain.report.cli",
    "finegrain.tune.cli",
    "finegrain.detect.cli",
)


def _base_type(tp):
    """The scalar type of a field annotation like ``int``, ``str | None`` or ``tuple[float, ...] | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return (typing.get_args(tp)[0], len(typing.get_args(tp)))
    return tp


def _add_flag(group, flag: str, dest: str, tp, f: dataclasses.Field, help_: str) -> None:
    """One ``--flag`` for field ``f`` of scalar type ``tp`` (see :func:`_base_type`)."""
    help_ += f" (default: {f.default})" if f.default not in (None, "") else ""
    metavar = f.name.upper()
    if tp is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
    elif isinstance(tp, tuple):
        group.add_argument(flag, dest=dest, type=tp[0], nargs=tp[1], default=argparse.SUPPRESS, help=help_, metavar=metavar)
    else:
        group.add_argument(flag, dest=dest, type=tp, default=argparse.SUPPRESS, help=help_, metavar=metavar)


def add_config_flags(parser: argparse.ArgumentParser, kind: type, prefix: str) -> None:
    """One flag per field of dataclass ``kind``; dest is ``prefix.field``."""
    hints = typing.get_type_hints(kind)
    group = parser.add_argument_group(kind.__name__.replace("Config", "").lower())
    for f in cli_fields(kind):
        _add_flag(group, "--" + f.name.replace("_", "-"), f"{prefix}.{f.name}", _base_type(hints[f.name]), f, f.metadata.get("help", ""))


def add_option_flags(parser: argparse.ArgumentParser, trainer: str = "supervised") -> None:
    """One flag per task option of the tasks trained by ``trainer``; dest is ``option.<flag>``.

    A flag several tasks declare is one flag (its help names the tasks).
    """
    from finegrain.tasks import TASKS

    group = parser.add_argument_group("task options (each applies to the tasks named)")
    for flag, owners in option_flags().items():
        owners = [(t, f) for t, f in owners if TASKS.get(t).trainer == trainer]
        if not owners:
            continue
        task, f = owners[0]
        tp = _base_type(typing.get_type_hints(TASKS.get(task).Options)[f.name])
        tasks = " / ".join(sorted({task_choice(t) for t, _ in owners}))
        _add_flag(group, f"--{flag}", f"option.{flag}", tp, f, f"{f.metadata.get('help', '')} ({tasks})")


def given_options(args: argparse.Namespace) -> dict:
    """``{flag: value}`` of the task option flags given on the command line."""
    return {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("option.")}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build a RunConfig: defaults, then ``--config FILE``, then explicit flags."""
    import yaml

    base = RunConfig().to_dict()
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        for section, values in loaded.items():
            if section not in base or not isinstance(values, dict):
                raise ValueError(f"{path}: unknown section {section!r}; expected data, model, train")
            base[section].update(values)
    for key, value in vars(args).items():
        if "." in key and not key.startswith("option."):
            section, name = key.split(".", 1)
            base[section][name] = value
    options = dict(base["model"].get("options") or {})
    options.update(options_from_flags(base["model"]["task"], given_options(args)))
    base["model"]["options"] = options or None
    return RunConfig.from_dict(base)


def _cmd_train(args) -> int:
    from finegrain.train.run import fit

    result = fit(config_from_args(args))
    print(json.dumps({"run_dir": str(result.run_dir), "best_checkpoint": str(result.best_checkpoint),
                      "best_epoch": result.best_epoch, "best_val_top1": result.best_val_top1,
                      "interrupted": result.interrupted}, indent=1))
    return 130 if result.interrupted else 0


def _cmd_distill(args) -> int:
    if not getattr(args, "option.teacher", None):
        raise ValueError("distill needs --teacher CHECKPOINT")
    setattr(args, "model.task", "distill")
    setattr(args, "model.backbone", args.student)
    return _cmd_train(args)


def add_answering_flags(p) -> None:
    """``--reject``, ``--reject-threshold`` and ``--rollup`` (predict and serve)."""
    p.add_argument("--reject", default=None, choices=("msp", "energy", "max_logit", "knn"),
                   help="answer 'unknown' when this open-set score is below the checkpoint's threshold (fitted at 95%% TPR "
                        "on validation images by train or `finegrain calibrate`)")
    p.add_argument("--reject-threshold", type=float, default=None, help="use this threshold instead of the stored one")
    p.add_argument("--rollup", type=float, default=None, metavar="P",
                   help="with a class hierarchy: below P, answer the deepest ancestor whose probability reaches P")


def answering_from(args):
    from finegrain.predict import Answering

    return Answering(reject=args.reject, reject_threshold=args.reject_threshold, rollup=args.rollup)


def _answer_text(r: dict) -> str:
    """The table's answer column: the class, "unknown", or the rolled-up node and its level."""
    if r.get("unknown"):
        o = r["openset"]
        return f"unknown ({o['score']} {o['value']:.3g} < {o['threshold']:.3g})"
    if r.get("rollup", {}).get("level", 0) > 0:
        u = r["rollup"]
        return f"{u['level_name']} {u['name']} ({u['score']:.3f}), class uncertain"
    return r["topk"][0]["class"]


def _cmd_predict(args) -> int:
    from finegrain.predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, tta_flip=args.tta_flip,
                                          answering=answering_from(args))
    results = predictor.predict(args.images, topk=args.topk)
    if not results:
        raise FileNotFoundError(f"no images found in {args.images}")
    if args.format == "json":
        print(json.dumps(results, indent=1))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["path", "rank", "class", "index", "score", "error", "answer"])
        for r in results:
            for rank, t in enumerate(r.get("topk", []), 1):
                w.writerow([r["path"], rank, t["class"], t["index"], t["score"], "", _answer_text(r) if rank == 1 else ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", "", r["error"], ""])
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table()
        t.add_column("image")
        answers = args.reject is not None or args.rollup is not None
        if answers:
            t.add_column("answer")
        t.add_column(f"top-{args.topk}")
        for r in results:
            cells = [r["error"]] if "error" in r else [", ".join(f"{x['class']} {x['score']:.3f}" for x in r["topk"])]
            t.add_row(r["path"], *([("" if "error" in r else _answer_text(r))] if answers else []), *cells)
        Console(width=None if sys.stdout.isatty() else 400).print(t)  # the results go to stdout (`> preds.txt`); progress and errors stay on stderr
    failed = [r for r in results if "error" in r]
    if failed:
        from finegrain.utils import console

        console.print(f"[yellow]{len(failed)} of {len(results)} images could not be read, e.g. {failed[0]['path']}: "
                      f"{failed[0]['error']}")
    return 2 if len(failed) == len(results) else 0


def _cmd_list_backbones(args) -> int:
    import timm

    names = timm.list_models(args.pattern or "*", pretrained=args.pretrained)
    print("\n".join(names))
    return 0


def _cmd_datasets(args) -> int:
    from finegrain.data import DATASETS

    for name in DATASETS.names():
        doc = (DATASETS.get(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a training run: every config field and every task option."""
    for kind, prefix in ((DataConfig, "data"), (ModelConfig, "model"), (TrainConfig, "train")):
        add_config_flags(parser, kind, prefix)
    add_option_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finegrain", description="Fine-grained image recognition.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier (validation split carved from train)")
    p.add_argument("--config", help="YAML file with data/model/train sections; flags override it")
    add_run_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill", help="train a small student from a trained teacher checkpoint (train's flags apply)")
    p.add_argument("--student", required=True, help="timm name of the student backbone")
    p.add_argument("--config", help="YAML file with data/model/train sections; flags override it")
    add_run_flags(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--tta-flip", action="store_true", help="average with the mirrored image")
    p.add_argument("--device", default="auto")
    add_answering_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("list-backbones", help="timm backbone names matching a pattern")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="only those with hub weights")
    p.set_defaults(func=_cmd_list_backbones)

    p = sub.add_parser("datasets", help="list the dataset readers")
    p.set_defaults(func=_cmd_datasets)

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # that part is not in this build
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError, TypeError, ImportError) as e:  # OSError: missing, unreadable or unwritable files
        from rich.markup import escape

        from finegrain.utils import console

        console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)  # one line to grep
        return 2
    except KeyboardInterrupt as e:  # a trainer has saved a resumable state and says how to continue
        from finegrain.utils import console

        console.print(f"[yellow]interrupted[/yellow] {e}", markup=True, highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())

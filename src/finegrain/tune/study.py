"""``run_study``: hyperparameter search over ``RunConfig`` fields with Optuna.

Every trial is an ordinary ``fit`` run in ``<study>/trials/trial-NNN``. The objective is the
trial's best validation top-1 (the split carved from the training images; the test split is never
read). After each epoch the validation top-1 goes to the pruner, which stops trials that trail the
median of earlier trials at the same epoch; a pruned trial keeps its run folder, consistent and
resumable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finegrain.checkpoint import write_csv_atomic, write_text_atomic
from finegrain.config import RunConfig
from finegrain.train.run import fit
from finegrain.tune.space import Dimension, apply, check_space, grid_size, parse_space
from finegrain.utils import console

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")


@dataclass
class StudyResult:
    """What ``run_study`` returns: the study folder, the best trial and one row per trial."""

    study_dir: Path
    best_value: float | None
    best_params: dict
    best_config: Path | None
    trials: list[dict] = field(default_factory=list)
    interrupted: bool = False


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("finegrain tune needs Optuna: pip install 'finegrain[tune]'") from e
    return optuna


def _sampler(optuna, name: str, dims: list[Dimension], seed: int):
    if name == "grid":
        return optuna.samplers.GridSampler({d.key: d.grid() for d in dims}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(optuna, name: str, startup_trials: int, warmup_epochs: int):
    if name == "none":
        return optuna.pruners.NopPruner()
    # Steps are 1-based epochs; Optuna never prunes while step < n_warmup_steps.
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)


def _check_study_args(cfg: RunConfig, dims: list[Dimension], trials: int | None, sampler: str) -> int:
    """Check the base config and the space for a study; returns the number of trials to run."""
    cfg.check()
    if cfg.train.resume:
        raise ValueError("finegrain tune starts new runs; drop --resume")
    if cfg.data.val_fraction <= 0:
        raise ValueError("finegrain tune maximises validation top-1: set --val-fraction > 0 (the test split is never used)")
    check_space(cfg, dims)
    if sampler == "grid":
        n_grid = grid_size(dims)
        if trials is not None and trials > n_grid:
            console.print(f"[yellow]the grid has {n_grid} points: running {n_grid} trials, not {trials}")
        trials = n_grid if trials is None else min(trials, n_grid)
    if trials is None or trials < 1:
        raise ValueError(f"pass --trials N (at least 1) for the {sampler} sampler" if trials is None
                         else f"--trials must be at least 1, got {trials}")
    return trials


def _build_study(optuna, cfg: RunConfig, dims: list[Dimension], settings: dict):
    """Create the study folder with its ``study.json`` and the Optuna study; returns ``(study, study_dir)``."""
    name = cfg.train.name or f"tune-{cfg.model.backbone}-{Path(cfg.data.data).stem or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"
    study_dir = Path(cfg.train.out) / name
    if (study_dir / "study.json").exists():
        raise FileExistsError(f"{study_dir} already holds a study; pass another --name")
    study_dir.mkdir(parents=True, exist_ok=True)
    settings = {"space": [str(d) for d in dims], **settings,
                "objective": "best validation top-1 (%), maximised", "base_config": cfg.to_dict()}
    write_text_atomic(study_dir / "study.json", json.dumps(settings, indent=1))
    study = optuna.create_study(direction="maximize", study_name=name,
                                sampler=_sampler(optuna, settings["sampler"], dims, settings["seed"]),
                                pruner=_pruner(optuna, settings["pruner"], settings["prune_startup_trials"], settings["prune_warmup_epochs"]))
    return study, study_dir


def _run_trial(optuna, trial, cfg: RunConfig, dims: list[Dimension], study_dir: Path) -> float:
    """Run one trial: ``fit`` the config its sampled parameters give, reporting each epoch to the pruner; returns its objective."""
    params = {d.key: d.suggest(trial) for d in dims}
    run_cfg = apply(cfg, params)
    run_cfg.train.out, run_cfg.train.name = str(study_dir / "trials"), f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(study_dir / "trials" / run_cfg.train.name))
    console.print(f"[bold]trial {trial.number}[/bold] " + " ".join(f"{k}={_fmt(v)}" for k, v in params.items()))

    def on_epoch(row: dict) -> None:
        value = row.get("val_top1")
        if value is None:
            return
        trial.report(value, row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation top-1 {value:.2f}% at epoch {row['epoch']} trails the median")

    try:
        result = fit(run_cfg, on_epoch=on_epoch)
    except (ValueError, FloatingPointError) as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        raise
    if result.interrupted:
        raise KeyboardInterrupt
    trial.set_user_attr("best_epoch", result.best_epoch)
    if result.best_val_top1 is None or not math.isfinite(result.best_val_top1):
        raise ValueError(f"trial {trial.number} produced no validation top-1")
    return float(result.best_val_top1)


def _optimize(optuna, study, cfg: RunConfig, dims: list[Dimension], study_dir: Path, trials: int, timeout: float | None) -> bool:
    """Run the trials, rewriting the results after each; returns whether Ctrl-C stopped the study."""

    def after_trial(study_, trial) -> None:
        _write_results(study_dir, study_, dims)
        state = trial.state.name.lower()
        text = f"{trial.value:.2f}%" if trial.value is not None else trial.user_attrs.get("error", "")
        console.print(f"trial {trial.number} {state} {text}")

    try:
        study.optimize(lambda trial: _run_trial(optuna, trial, cfg, dims, study_dir), n_trials=trials, timeout=timeout,
                       catch=(ValueError, FloatingPointError), callbacks=[after_trial])
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: results so far are in the study folder")
        return True
    return False


def _study_result(optuna, study, cfg: RunConfig, study_dir: Path, rows: list[dict], interrupted: bool) -> StudyResult:
    """The :class:`StudyResult`, after writing the best trial's config to ``best.yaml``; raises if no trial finished."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        if interrupted:
            return StudyResult(study_dir, None, {}, None, rows, interrupted=True)
        errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
        raise ValueError(f"no trial finished ({len(study.trials)} run, see {study_dir / 'trials.csv'})"
                         + (f"; first error: {errors[0]}" if errors else ""))
    best = study.best_trial
    best_cfg = apply(cfg, best.params)
    best_cfg.train.out, best_cfg.train.name, best_cfg.train.resume = cfg.train.out, None, None  # a fresh, auto-named run
    best_path = study_dir / "best.yaml"
    write_text_atomic(best_path, f"# best trial {best.number} of {study_dir.name}: validation top-1 {best.value:.2f}%\n"
                                 f"# train it: finegrain train --config {best_path}\n"
                                 + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    return StudyResult(study_dir, float(best.value), dict(best.params), best_path, rows, interrupted)


def run_study(
    cfg: RunConfig,
    space: Sequence[str | Dimension],
    *,
    trials: int | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    prune_startup_trials: int = 2,
    prune_warmup_epochs: int = 1,
    seed: int = 0,
    timeout: float | None = None,
) -> StudyResult:
    """Search ``space`` around the base config ``cfg`` and keep everything in a study folder.

    Args:
        cfg: the base run config; ``cfg.train.out`` / ``cfg.train.name`` place the study folder
            (default name ``tune-<backbone>-<data>-<time>``).
        space: ``section.field=kind:args`` specs (see :mod:`finegrain.tune.space`) or parsed
            dimensions.
        trials: how many trials; default (and at most) the grid size for the grid sampler.
        sampler: "tpe", "random" or "grid".
        pruner: "median" (stop a trial whose validation top-1 trails the median of finished trials
            at the same epoch) or "none".
        prune_startup_trials: no pruning until this many trials have finished.
        prune_warmup_epochs: a trial is never pruned during its first this many epochs.
        seed: sampler seed (the trials themselves use ``cfg.train.seed``).
        timeout: stop starting new trials after this many seconds.

    Returns:
        A :class:`StudyResult`; the folder holds ``trials.csv``, ``trials.json``, ``study.json``
        and ``best.yaml`` (the best trial's config, for ``finegrain train --config best.yaml``).

    Raises:
        ValueError: a bad space, sampler or pruner, no validation split, or every trial failed.
        ImportError: Optuna is not installed (the ``tune`` extra).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"--search must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if prune_startup_trials < 0 or prune_warmup_epochs < 0:
        raise ValueError("--prune-startup-trials and --prune-warmup-epochs must be >= 0")
    dims = parse_space(space)
    trials = _check_study_args(cfg, dims, trials, sampler)
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {"sampler": sampler, "pruner": pruner, "trials": trials, "seed": seed,
                "prune_startup_trials": prune_startup_trials, "prune_warmup_epochs": prune_warmup_epochs}
    study, study_dir = _build_study(optuna, cfg, dims, settings)
    interrupted = _optimize(optuna, study, cfg, dims, study_dir, trials, timeout)
    rows = _write_results(study_dir, study, dims)
    return _study_result(optuna, study, cfg, study_dir, rows, interrupted)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_results(study_dir: Path, study, dims: list[Dimension]) -> list[dict]:
    """``trials.csv`` and ``trials.json``: one row per trial, best first (rewritten after each trial)."""
    rows = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "val_top1": t.value,
            "epochs": steps[-1] if steps else None,
            **{d.key: t.params.get(d.key) for d in dims},
            "seconds": round(t.duration.total_seconds(), 1) if t.duration is not None else None,
            "run_dir": t.user_attrs.get("run_dir"),
            "error": t.user_attrs.get("error", ""),
        })
    # finished trials first (best first), then pruned ones (at their last value), then failed ones
    rank = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (rank.get(r["state"], 2), -(r["val_top1"] or 0.0), r["trial"]))
    write_csv_atomic(study_dir / "trials.csv", [list(rows[0]), *(r.values() for r in rows)] if rows else [])
    write_text_atomic(study_dir / "trials.json", json.dumps(rows, indent=1))
    return rows


def print_study(result: StudyResult) -> None:
    """The trials as a rich table, best first."""
    from rich.table import Table

    rows = result.trials
    keys = [k for k in (rows[0] if rows else {}) if "." in k]
    t = Table(title=f"{result.study_dir.name}: {len(rows)} trials, objective validation top-1")
    for col in ("trial", "state", "val top-1 %", "epochs", *keys, "seconds"):
        t.add_column(col, justify="right" if col not in ("state",) else "left")
    for r in rows:
        style = "bold green" if r["val_top1"] is not None and r["val_top1"] == result.best_value else None
        t.add_row(str(r["trial"]), r["state"], "" if r["val_top1"] is None else f"{r['val_top1']:.2f}",
                  "" if r["epochs"] is None else str(r["epochs"]), *(_fmt(r[k]) for k in keys),
                  "" if r["seconds"] is None else f"{r['seconds']:.1f}", style=style)
    console.print(t)
    if result.best_config is not None:
        console.print(f"best: {result.best_value:.2f}% with " + " ".join(f"{k}={_fmt(v)}" for k, v in result.best_params.items()))
        console.print(f"train it: finegrain train --config {result.best_config}")
    console.print(f"results: {result.study_dir / 'trials.csv'}")

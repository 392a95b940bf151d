"""Search spaces over ``RunConfig`` fields, written as ``section.field=kind:args`` text.

Kinds:
  * ``uniform:LOW:HIGH[:N]``     a float in [LOW, HIGH]
  * ``loguniform:LOW:HIGH[:N]``  a float in [LOW, HIGH], sampled on a log scale (LOW > 0)
  * ``int:LOW:HIGH[:STEP]``      an integer in [LOW, HIGH] (both included), every STEP
  * ``choice:A,B,C``             one of the listed values, read as the field's type

``N`` is the number of grid points (linearly or log-spaced, ends included) the grid sampler uses
for a float range; random and TPE sampling ignore it and use the whole range.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig, cli_fields, option_flags, options_from_flags

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
KINDS = ("uniform", "loguniform", "int", "choice")
# Where the run goes and what it reads are not hyperparameters.
NOT_TUNABLE = {"data.data", "data.dataset", "data.download", "data.cache_dir", "train.out", "train.name", "train.resume",
               "train.device", "train.wandb_project", "train.wandb_mode", "model.teacher", "data.workers", "data.cache",
               "data.pipeline"}
_MAX_GRID = 1000


@dataclass(frozen=True)
class Dimension:
    """One searched field: ``key`` is ``section.field``; ``kind`` is one of :data:`KINDS`."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    grid_points: int | None = None
    choices: tuple = ()

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this dimension's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def grid(self) -> list:
        """The values the grid sampler visits."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        if not self.grid_points:
            raise ValueError(f"--space {self.key}: the grid sampler needs a number of points for a float range, "
                             f"e.g. {self.kind}:{self.low:g}:{self.high:g}:3")
        n = self.grid_points
        if n == 1:
            return [self.low]
        if self.kind == "loguniform":
            lo, hi = math.log(self.low), math.log(self.high)
            inner = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(1, n - 1)]
        else:
            inner = [self.low + (self.high - self.low) * i / (n - 1) for i in range(1, n - 1)]
        # short decimals inside; the ends exactly as given, so every point lies in [low, high]
        return [self.low] + [float(f"{v:.6g}") for v in inner] + [self.high]

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(map(str, self.choices))}"
        extra = f":{self.step}" if self.step else f":{self.grid_points}" if self.grid_points else ""
        return f"{self.key}={self.kind}:{self.low:g}:{self.high:g}{extra}"


def _resolve_key(name: str) -> str:
    """``train.lr``, ``lr`` or ``--scale-min`` -> ``section.field`` (bare names must be unique)."""
    name = name.strip().lstrip("-").replace("-", "_")
    all_keys = [f"{s}.{f.name}" for s, kind in SECTIONS.items() for f in cli_fields(kind)] + list(_option_keys())
    if "." in name:
        section, field = name.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {name!r}; use data, model or train (e.g. train.lr)")
        if f"{section}.{field}" not in all_keys:
            fields = [k.split(".", 1)[1] for k in all_keys if k.startswith(section + ".")]
            close = difflib.get_close_matches(field, fields, n=3)
            raise ValueError(f"{section} has no field {field!r}" + (f"; did you mean {', '.join(close)}?" if close else
                             f"; its fields are {', '.join(fields)}"))
        return f"{section}.{field}"
    matches = [k for k in all_keys if k.split(".", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"{name!r} is ambiguous: write one of {', '.join(matches)}")
    close = difflib.get_close_matches(name, [k.split(".", 1)[1] for k in all_keys], n=3)
    raise ValueError(f"no config field {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                     "; write section.field, e.g. train.lr or data.scale_min"))


def _option_keys() -> dict[str, tuple[type, str]]:
    """Task options as ``model.<flag_name>`` keys (``model.attention``, ``model.wsdan_parts``): ``{key: (Options class, field)}``."""
    from finegrain.tasks import TASKS

    return {f"model.{flag.replace('-', '_')}": (TASKS.get(owners[0][0]).Options, owners[0][1].name)
            for flag, owners in option_flags().items()}


def _field_type(key: str):
    section, field = key.split(".", 1)
    options = _option_keys()
    kind, field = options[key] if key in options else (SECTIONS[section], field)
    hint = typing.get_type_hints(kind)[field]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if args else hint
    if typing.get_origin(base) is tuple:
        raise ValueError(f"{key} holds several numbers and cannot be searched")
    return base, optional


def _number(text: str, spec: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--space {spec!r}: {what} must be a number, got {text!r}") from None


def _convert(value: str, tp, optional: bool, key: str, spec: str):
    v = value.strip()
    if optional and v.lower() in ("none", "null"):
        return None
    if tp is bool:
        if v.lower() in ("true", "yes", "1", "on"):
            return True
        if v.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"--space {spec!r}: {key} is true/false, got {v!r}")
    if tp is int:
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"--space {spec!r}: {key} is an integer, got {v!r}") from None
    if tp is float:
        return _number(v, spec, f"each value of {key}")
    if not v:
        raise ValueError(f"--space {spec!r}: empty choice")
    return v


def parse_dimension(spec: str) -> Dimension:
    """Parse one ``section.field=kind:args`` spec (see the module docstring).

    Raises:
        ValueError: naming the spec and what is wrong with it (unknown field or kind, bounds that
            are not numbers or not ordered, values of the wrong type, fields that are not
            hyperparameters).
    """
    if "=" not in spec:
        raise ValueError(f"--space {spec!r}: expected FIELD=KIND:ARGS, e.g. train.lr=loguniform:1e-4:1e-2")
    name, _, rule = spec.partition("=")
    key = _resolve_key(name)
    if key in NOT_TUNABLE:
        raise ValueError(f"--space {spec!r}: {key} says where the run reads or writes, not how it trains; set it as a flag")
    kind, _, args = rule.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        raise ValueError(f"--space {spec!r}: unknown kind {kind!r}; use {', '.join(KINDS)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    tp, optional = _field_type(key)
    if kind == "choice":
        values = [_convert(v, tp, optional, key, spec) for v in args.split(",")] if args.strip() else []
        if not values:
            raise ValueError(f"--space {spec!r}: choice needs values, e.g. {key}=choice:a,b")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"--space {spec!r}: a value is listed twice")
        return Dimension(key, "choice", choices=tuple(values))
    parts = args.split(":") if args else []
    if len(parts) not in (2, 3):
        usage = f"{kind}:LOW:HIGH" + (":STEP" if kind == "int" else "[:GRID_POINTS]")
        raise ValueError(f"--space {spec!r}: {kind} takes {usage}")
    if tp not in (int, float):
        raise ValueError(f"--space {spec!r}: {key} is not a number ({getattr(tp, '__name__', tp)}); use choice:A,B")
    low, high = _number(parts[0], spec, "LOW"), _number(parts[1], spec, "HIGH")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"--space {spec!r}: need LOW < HIGH, got {parts[0]} and {parts[1]}")
    extra = None
    if len(parts) == 3:
        extra_f = _number(parts[2], spec, "the third number")
        if extra_f != int(extra_f) or extra_f < 1:
            raise ValueError(f"--space {spec!r}: the third number must be a positive integer, got {parts[2]}")
        extra = int(extra_f)
    if kind == "int":
        if tp is not int:
            raise ValueError(f"--space {spec!r}: {key} is a float; use uniform or loguniform")
        if low != int(low) or high != int(high):
            raise ValueError(f"--space {spec!r}: int bounds must be integers, got {parts[0]} and {parts[1]}")
        return Dimension(key, "int", low=int(low), high=int(high), step=extra)
    if tp is int:
        raise ValueError(f"--space {spec!r}: {key} is an integer; use int:LOW:HIGH")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"--space {spec!r}: loguniform needs LOW > 0, got {parts[0]}")
    return Dimension(key, kind, low=low, high=high, grid_points=extra)


def parse_space(specs) -> list[Dimension]:
    """Parse several specs (strings, or already parsed :class:`Dimension` objects); a field may appear once."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("no search space: pass at least one --space FIELD=KIND:ARGS, e.g. --space train.lr=loguniform:1e-4:1e-2")
    dims = [s if isinstance(s, Dimension) else parse_dimension(str(s)) for s in specs]
    seen: set[str] = set()
    for d in dims:
        if d.key in seen:
            raise ValueError(f"--space names {d.key} twice; give one rule per field")
        seen.add(d.key)
    return dims


def grid_size(dims: list[Dimension]) -> int:
    """How many configurations the grid sampler visits (the product of the grids)."""
    n = 1
    for d in dims:
        n *= len(d.grid())
    if n > _MAX_GRID:
        raise ValueError(f"the grid has {n} points (more than {_MAX_GRID}); use fewer values or --sampler random/tpe")
    return n


def apply(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with ``{"section.field": value}`` set."""
    d = cfg.to_dict()
    options = _option_keys()
    for key, value in params.items():
        if key not in options:
            section, field = key.split(".", 1)
            d[section][field] = value
    given = {key.split(".", 1)[1]: value for key, value in params.items() if key in options}
    if given:  # task options, for the task the other params leave
        d["model"]["options"] = {**(d["model"].get("options") or {}), **options_from_flags(d["model"]["task"], given)}
    return RunConfig.from_dict(d)


def check_space(cfg: RunConfig, dims: list[Dimension]) -> None:
    """Fail early when a value of the space makes an invalid config with the other flags.

    Each choice and both ends of each range are checked on their own against ``cfg`` (not every
    combination), e.g. ``model.attention=choice:none,se`` without ``--task fgvc``.
    """
    for d in dims:
        values = d.choices if d.kind == "choice" else (d.low, d.high)
        for v in values:
            if d.kind == "int":
                v = int(v)
            try:
                apply(cfg, {d.key: v}).check()
            except (ValueError, TypeError) as e:
                raise ValueError(f"--space {d}: {d.key}={v!r} gives an invalid config: {e}") from None

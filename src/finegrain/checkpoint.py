"""Self-describing checkpoints: safetensors weights with typed JSON metadata, written atomically.

A checkpoint file (``best.safetensors``, ``last.safetensors``, or what ``prune``, ``quantize
--qat``, ``enroll`` write) holds a task's weights and, in the safetensors header, a
:class:`CheckpointMeta`: backbone, task and its arguments, class names, preprocessing, metrics,
the run's config, package versions, the layer sizes of a pruned model, and the lineage of a
derived checkpoint (what it was pruned, QAT-tuned, enrolled or distilled from).

The API is small: :func:`describe` (metadata of a new task), :func:`derive` (metadata of a
checkpoint made from another one), :func:`save`, :func:`read_meta`, :func:`load` (weights and
metadata) and :func:`load_task` (the task, rebuilt and loaded). The optimizer, scheduler and RNG
state needed to resume sit beside ``last.safetensors`` in ``last.state.pt``, read back with
``torch.load(weights_only=True)`` (tensors, numbers and containers only).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
"""2: typed metadata with ``lineage`` and the task's options under ``model.options``.
1 (finegrain 0.1 before the checkpoint layer): flat task options in ``model``, ``source_checkpoint``;
read as version 2."""
META_KEY = "finegrain"
EXTRA_PREFIX = "openset."
"""Tensors under this prefix are data stored with the weights (the open-set bank), not weights."""


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself (the safetensors header's ``finegrain`` entry).

    Attributes:
        task: the registered task that loads the weights.
        task_args: its constructor arguments (JSON).
        model: the shared model config (backbone, pretrained, drop rates, trained task and options).
        num_classes, classes: the output classes and their names.
        preprocessing: eval preprocessing (``img_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``).
        metrics: metrics of the epoch the weights are from (validation, or what made them).
        config: the run config that trained it, when a run did.
        epoch, step: where in the run the weights are from.
        trained_as: the task that trained it when that differs from ``task`` (a distilled student).
        structure: changed layer sizes of a pruned model (see :func:`finegrain.models.structure.apply_structure`).
        lineage: one entry per derivation, oldest first: ``{"kind", "source", "at", ...details}``.
        fewshot, pruning, qat, enrolled: what the few-shot trainer, pruning, QAT and enrollment record.
        calibration: the fitted temperature and NLL/ECE before and after (:mod:`finegrain.eval.calibration`).
        openset: open-set score thresholds for a target TPR, and the kNN bank's size (:mod:`finegrain.eval.openset`);
            the bank itself is the ``openset.bank`` tensor of the file.
        hierarchy: the class taxonomy (:class:`finegrain.eval.hierarchy.Taxonomy` as a dict).
        detection: how a detector was trained: ``labels`` ("species" or "object"), annotation ``format``, ``masks``.
    """

    task: str
    num_classes: int
    classes: list[str]
    preprocessing: dict[str, Any]
    model: dict[str, Any]
    task_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    epoch: int | None = None
    step: int = 0
    trained_as: str | None = None
    structure: dict[str, dict] | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    fewshot: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    qat: dict[str, Any] | None = None
    enrolled: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    openset: dict[str, Any] | None = None
    hierarchy: dict[str, Any] | None = None
    detection: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) != self.num_classes:
            raise ValueError(f"checkpoint metadata names {len(self.classes)} classes for {self.num_classes} outputs")

    def __getitem__(self, key: str) -> Any:  # meta["classes"] reads as well as meta.classes
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    @property
    def backbone(self) -> str:
        return self.model["backbone"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, path: str | Path = "checkpoint") -> CheckpointMeta:
        """Read metadata of format 1 or 2; a newer format is refused naming the version and the fix."""
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{path} has checkpoint format {version!r}; this finegrain reads formats 1 to {FORMAT_VERSION}. "
                             f"It was written by finegrain {d.get('versions', {}).get('finegrain', '?')}: upgrade finegrain.")
        d = dict(d)
        if version < 2:
            d = _upgrade_v1(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{path}: unknown checkpoint metadata fields {unknown}; it was written by another finegrain "
                             f"({d.get('versions', {}).get('finegrain', '?')}): upgrade finegrain")
        return cls(**d)


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    from finegrain.config import options_from_flat

    source = d.pop("source_checkpoint", None)
    kind = "pruned" if "pruning" in d else "qat" if "qat" in d else "derived"
    if source is not None:
        d["lineage"] = [{"kind": kind, "source": source}]
    model = dict(d.get("model", {}))
    model.setdefault("task", d.get("trained_as") or d.get("task", "supervised"))
    try:
        d["model"] = options_from_flat(model)
    except ValueError:  # options of a task this build lacks: keep what the weights need
        d["model"] = {k: model[k] for k in ("backbone", "pretrained", "task", "drop_rate", "drop_path_rate") if k in model}
    d["format_version"] = 2
    return d


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut must not leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_write`; returns the path."""
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through :func:`atomic_write`; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | os.PathLike, rows) -> Path:
    """Write ``rows`` (sequences of cells, the header first) as CSV through :func:`atomic_write`; returns the path."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from finegrain import __version__

    return {"finegrain": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def describe(task, *, model: dict[str, Any], classes: list[str], preprocessing: dict[str, Any], **fields: Any) -> CheckpointMeta:
    """Metadata of a checkpoint of ``task``'s weights (the one place a new checkpoint is described).

    Args:
        task: the task (its name and ``task_args()`` are recorded).
        model: the shared model config as a dict (``dataclasses.asdict(ModelConfig)``).
        classes: class names (few-shot tasks: episode slots).
        preprocessing: eval preprocessing.
        fields: other :class:`CheckpointMeta` fields (``config``, ``metrics``, ``epoch``, ``fewshot``, ...).
    """
    args = task.task_args()
    # a task built from other checkpoints (distillation's teacher) records them as its lineage
    lineage = [{"kind": task.name, "role": key, "source": str(args[key])} for key in type(task).checkpoint_args if args.get(key)]
    fields["lineage"] = [*lineage, *fields.get("lineage", [])]
    return CheckpointMeta(task=task.name, task_args=args, model=dict(model), num_classes=task.num_classes,
                          classes=list(classes), preprocessing=dict(preprocessing), **fields)


def inference_meta(task, meta: CheckpointMeta, **fields: Any) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    """``(metadata, weights)`` of the checkpoint that predicts with ``task`` (a distilled student: a plain model)."""
    name, args, weights = task.inference_form()
    changes = {"task": name, "task_args": args, **fields}
    if name != meta.task:
        changes["trained_as"] = meta.task
    return dataclasses.replace(meta, **changes), weights


def derive(meta: CheckpointMeta, kind: str, source: str | Path, *, details: dict[str, Any] | None = None,
           **changes: Any) -> CheckpointMeta:
    """Metadata of a checkpoint made from ``source`` (``kind``: "pruned", "qat", "enrolled", ...).

    Metrics, the epoch, the temperature and the open-set thresholds are reset (they describe the
    old weights) unless ``changes`` give them; the derivation is appended to ``lineage``.
    """
    entry = {"kind": kind, "source": str(source), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(details or {})}
    changes = {"metrics": {}, "epoch": None, "step": 0, "calibration": None, "openset": None, **changes}
    return dataclasses.replace(meta, lineage=[*meta.lineage, entry], versions={}, **changes)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (its ``best.safetensors``, else ``last``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no best.safetensors or last.safetensors in run folder {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def save(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write ``state_dict`` and ``meta`` to ``path`` atomically (package versions are filled in)."""
    from safetensors.torch import save_file

    if not isinstance(meta, CheckpointMeta):
        raise TypeError(f"meta must be a CheckpointMeta (see finegrain.checkpoint.describe), got {type(meta).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    full = dataclasses.replace(meta, format_version=FORMAT_VERSION, versions=versions())
    header = {META_KEY: json.dumps(full.to_dict())}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))
    return Path(path)


def read_meta(path: str | Path) -> CheckpointMeta:
    """Read and check a checkpoint's metadata without loading its weights."""
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    if META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file without finegrain metadata; train with finegrain or load it as --pretrained")
    damaged = f"{path}: its finegrain metadata is damaged or was edited by hand; use an intact copy of the checkpoint"
    try:
        d = json.loads(header[META_KEY])
    except ValueError as e:
        raise ValueError(f"{damaged} (not JSON: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{damaged} (a JSON {type(d).__name__}, not an object)")
    try:
        return CheckpointMeta.from_dict(d, path=path)
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{damaged} ({type(e).__name__}: {e})") from None


def load(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Return ``(state_dict, metadata)`` of a checkpoint file or run folder."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    meta = read_meta(path)
    try:
        sd = load_file(str(path), device=map_location)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: could not read the weights (truncated or corrupt?): {e}") from e
    return {k: v for k, v in sd.items() if not k.startswith(EXTRA_PREFIX)}, meta


def load_extra(path: str | Path, key: str) -> torch.Tensor | None:
    """A stored tensor that is not a weight (e.g. the open-set bank ``openset.bank``), or None."""
    from safetensors import safe_open

    with safe_open(str(resolve_checkpoint(path)), framework="pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def build_task(name: str, model, num_classes: int, args: dict[str, Any]):
    """The registered task ``name`` around ``model``; arguments that name a checkpoint (a teacher) are opened."""
    from finegrain.tasks import TASKS, LoadedCheckpoint
    from finegrain.tasks import build_task as _build

    args = dict(args)
    for key in TASKS.get(name).checkpoint_args:
        if isinstance(args.get(key), (str, Path)) and args[key]:
            task, meta = load_task(args[key])
            args[key] = LoadedCheckpoint(task, meta, str(args[key]))
    return _build(name, model, num_classes, **args)


def load_task(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the task a checkpoint describes and load its weights; return ``(task, metadata)`` in eval mode."""
    from finegrain.models.backbone import create_backbone
    from finegrain.models.structure import apply_structure
    from finegrain.utils import resolve_device

    sd, meta = load(path)
    m = meta.model
    model = create_backbone(m["backbone"], num_classes=meta.num_classes, pretrained="none",
                            drop_rate=m.get("drop_rate", 0.0), drop_path_rate=m.get("drop_path_rate", 0.0))
    task = build_task(meta.task, model, meta.num_classes, meta.task_args)
    if meta.structure:  # a pruned model: re-shape the fresh layers to the stored sizes
        apply_structure(task, meta.structure, sd)
    try:
        task.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match the model it describes ({m['backbone']}, task {meta.task}): "
                         f"{_mismatch(task.state_dict(), sd) or e}. A checkpoint saved before a change to this task's "
                         "layers (e.g. TransFG's overlapping patch embedding, the dual attention's convolutions) "
                         "does not load: train it again") from e
    return task.to(resolve_device(str(device)) if isinstance(device, str) else device).eval(), meta


def _mismatch(expected: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> str:
    """What differs between the weights a task builds and those a file holds (a few names of each kind)."""
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = sorted(k for k in set(expected) & set(stored) if expected[k].shape != stored[k].shape)
    parts = [f"{label} {few(names)}" for label, names in (("missing", missing), ("not in the model", unexpected),
                                                          ("other shape", shapes)) if names]
    return "; ".join(parts)


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no resume state at {path}; resume needs a run folder with last.state.pt")
    from finegrain.models.backbone import torch_load_safely

    state = torch_load_safely(path, "resume state", "Delete it to start the run over, or resume from a copy you trust.")
    if not isinstance(state, dict):
        raise ValueError(f"{path} (resume state) is not a dict of training state; delete it to start the run over")
    return state

"""A Task is an ``nn.Module`` whose ``forward(batch)`` returns at least ``{"loss", "logits"}``.

Every method (plain supervised training, WS-DAN, distillation, ...) is a Task, and all of them
share the one training loop in :mod:`finegrain.train.loop`. ``predict(images)`` is the
inference path without training-only branches; the Predictor and exporters call only it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")


def option(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A field of a task's options: ``help`` becomes the flag's help text, ``flag`` its name (without ``--``).

    Flags are shared by name across tasks: two tasks that declare the same flag give the same
    option (``--parts-pool`` for ``parts`` and ``parts-weak``).
    """
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class TaskOptions:
    """A task's own options: the fields are keyword arguments of the task's constructor.

    Each task declares a subclass next to itself (``WSDANTask.Options``); the CLI makes a flag of
    each field (its ``flag`` metadata, default ``--<field-name>``) and a run's ``config.yaml``
    stores them under ``model.options``.
    """

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag when a value is out of range."""

    @classmethod
    def flags(cls) -> dict[str, str]:
        """``{flag name: field name}``."""
        return {flag_name(f): f.name for f in dataclasses.fields(cls)}


def flag_name(f: dataclasses.Field) -> str:
    """The CLI flag (without ``--``) of an options field."""
    return f.metadata.get("flag") or f.name.replace("_", "-")


@dataclass(frozen=True)
class BuildContext:
    """What a task may take from the run beyond its own options (see :meth:`Task.build_args`)."""

    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    preprocessing: dict | None = None


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint opened by :func:`finegrain.checkpoint.load_task`, handed to tasks that need one (a teacher)."""

    task: Task
    meta: Any
    path: str


class Task(nn.Module):
    """Base class. Subclasses wrap ``self.model`` (a timm-contract backbone with a classifier).

    Args:
        model: the network.
        num_classes: number of classes.
        label_smoothing: cross-entropy label smoothing.
    """

    name = "base"

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    """The task's own options (a :class:`TaskOptions` dataclass)."""

    trainer: ClassVar[str] = "supervised"
    """How the task is trained: "supervised" (``finegrain train``, batches of labelled images) or
    "episodic" (``finegrain fewshot train``, one episode per batch)."""

    selection_metric: ClassVar[str] = "val_top1"
    """The validation metric (higher is better) that picks a run's ``best.safetensors``: top-1 for
    classifiers, episode accuracy (``val_acc``) for few-shot methods; a detector would name mAP."""

    checkpoint_args: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that name another checkpoint (distillation's ``teacher``): the code
    that builds the task opens each and passes a :class:`LoadedCheckpoint`; ``task_args()``
    keeps the path."""

    annotations: tuple[str, ...] = ()
    """Annotations the task trains with ("boxes", "parts"); ``fit`` checks that the data set has
    them and the batches then hold ``"box"`` and/or ``"parts"`` (see ``ImageDataset``).
    ``predict`` never needs them."""

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    supports_class_weight = False
    """Whether the task's cross-entropy honours :meth:`set_class_weight` (``--class-weights``)."""

    class_weight: torch.Tensor | None = None

    def set_class_weight(self, weight: torch.Tensor | None) -> None:
        """Per-class weights ``[C]`` for the training loss (not saved: inference does not use them)."""
        if weight is not None and not self.supports_class_weight:
            raise ValueError(f"--class-weights is not supported by --task {self.name}; drop it, or balance the "
                             "classes with --sampler balanced instead")
        self.class_weight = weight

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    outputs: ClassVar[str] = "classes"
    """What :meth:`predict` returns: "classes" (logits over the checkpoint's classes, what predict,
    eval, explain, export and serve need) or "embeddings" (few-shot methods: features that are
    compared with a support set; see :func:`require_classifier`)."""

    cam_layer: ClassVar[str | None] = None
    """Submodule whose output Grad-CAM differentiates the logits against; None: the output of
    ``model.forward_features`` (the first call, the pass over the whole image)."""

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """The inference path with autograd left as the caller set it: what :meth:`predict` returns.

        Subclasses override this, not ``predict``; gradient-based explanations differentiate it.
        """
        return self.model(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised images (inference only, no autograd)."""
        return self.infer(images)

    def task_args(self) -> dict[str, Any]:
        """Keyword arguments needed to rebuild this task from a checkpoint (JSON-serialisable)."""
        return {}

    @classmethod
    def build_args(cls, options: TaskOptions, context: BuildContext) -> dict[str, Any]:
        """Constructor keyword arguments (beyond model and class count) from the task's options and the run."""
        return {"label_smoothing": context.label_smoothing, **dataclasses.asdict(options)}

    inference_name: str | None = None
    """Task to rebuild for inference when it differs from this one (e.g. a distilled student is
    a plain "supervised" model); its best checkpoint then holds ``inference_state_dict()``."""

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def inference_form(self) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """``(task name, task args, weights)`` of the checkpoint that predicts with this task."""
        if self.inference_name and self.inference_name != self.name:
            return self.inference_name, {}, self.inference_state_dict()
        return self.name, self.task_args(), self.state_dict()

    def annotation(self, batch: dict[str, Any], key: str) -> torch.Tensor:
        """``batch[key]`` ("box" or "parts") as float on the images' device (the loop passes them on)."""
        value = batch.get(key)
        if value is None:
            raise ValueError(f"task {self.name} trains with {key!r} annotations, but the batch has none: train it "
                             f"through finegrain.train.run.fit, or pass batch[{key!r}] (see ImageDataset(annotations=...))")
        return value.to(batch["image"].device, non_blocking=True).float()

    def new_parameter_names(self) -> set[str]:
        """Names of parameters that start untrained (they get the full learning rate)."""
        names = set()
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        for n, p in self.named_parameters():
            if not n.startswith("model.") or id(p) in head_ids:
                names.add(n)
        return names


def classifier_tasks() -> list[str]:
    """The registered tasks whose checkpoints predict classes (``Task.outputs == "classes"``)."""
    return [n for n in TASKS.names() if TASKS.get(n).outputs == "classes"]


def detection_tasks() -> list[str]:
    """The registered tasks whose checkpoints find objects (``Task.outputs == "detections"``)."""
    return [n for n in TASKS.names() if TASKS.get(n).outputs == "detections"]


_OTHER_COMMANDS = {"embeddings": "evaluate it with `finegrain fewshot eval`",
                   "detections": "evaluate it with `finegrain eval` or `finegrain detect eval`, run it with `finegrain detect predict`"}
"""Where a checkpoint that does not predict classes is used instead, by ``Task.outputs``."""


def require_classifier(task: Task, command: str) -> None:
    """Refuse a task whose ``predict`` does not return class logits, naming the tasks ``command`` supports."""
    if task.outputs == "classes":
        return
    raise ValueError(f"{command} needs a checkpoint that predicts classes; this is a {task.name} checkpoint, whose "
                     f"predict returns {task.outputs} ({_OTHER_COMMANDS.get(task.outputs, 'see finegrain --help')}). "
                     f"Supported tasks: {', '.join(classifier_tasks())}")


def plain_classifier_tasks() -> list[str]:
    """Tasks whose prediction is the backbone's own classifier, ``model(images)`` (no layers of their own)."""
    return [n for n in classifier_tasks() if TASKS.get(n).infer is Task.infer]


def require_plain_classifier(task: Task, command: str, why: str) -> None:
    """Refuse a task that adds layers or crops on top of its backbone (``why``: what ``command`` changes)."""
    require_classifier(task, command)
    if type(task).infer is Task.infer:
        return
    raise ValueError(f"{command} works on a plain backbone classifier, and {why}; this is a {task.name} checkpoint, "
                     f"whose own layers sit on top of the backbone. Supported tasks: {', '.join(plain_classifier_tasks())}")


def build_task(name: str, model: nn.Module, num_classes: int, **kwargs: Any) -> Task:
    r"""Build the registered task ``name`` around ``model`` from constructor keyword arguments.

    Arguments in the task's ``checkpoint_args`` must already be :class:`LoadedCheckpoint`\ s
    (:func:`finegrain.checkpoint.build_task` opens them from paths).
    """
    return TASKS.get(name)(model, num_classes, **kwargs)


def resolve_options(task: str, options: TaskOptions | dict | None) -> TaskOptions:
    """The task's options object from a dict of field values (or an options object), checked."""
    cls = TASKS.get(task).Options
    if options is None:
        options = cls()
    elif isinstance(options, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"task {task} has no options {unknown}; its options are {sorted(names) or 'none'}")
        options = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    elif not isinstance(options, cls):
        raise TypeError(f"options of task {task} must be a {cls.__name__} or a dict, got {type(options).__name__}")
    options.check()
    return options

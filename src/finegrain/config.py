"""Typed configuration for a run.

Each field carries its help text in ``metadata["help"]``; the CLI turns every field into a flag
(``--img-size``) with that text, and a run folder stores the config as YAML. Checks name the flag
to change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def cli_fields(kind: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(kind) if f.metadata.get("cli", True)]


@dataclass
class DataConfig:
    """Where the images are and how they are read and augmented."""

    data: str = _f("", "image folder, CSV file or benchmark root")
    dataset: str | None = _f(None, "reader name (folder, csv, cub, nabirds, dogs, cars, aircraft, flowers102); guessed from --data if unset")
    download: bool = _f(False, "download the benchmark into --data if it is missing (needs internet)")
    hierarchy: str | None = _f(None, "CSV of class,parent rows (parents may have parents): hierarchical answers and metrics; "
                               "default: the data set's own taxonomy (NABirds, FGVC-Aircraft), if any")
    img_size: int = _f(448, "training and evaluation crop size in pixels")
    crop: str = _f("none", "none (whole images), or box: train and validate on each image's bounding-box crop (data sets with "
                   "boxes, e.g. CUB's bounding_boxes.txt), enlarged by --crop-margin, before the augmentation; images "
                   "without a box are used whole. Stored in the checkpoint; `finegrain eval` then crops too")
    crop_margin: float = _f(0.1, "with --crop box: enlarge the box by this fraction of its width/height on each side (clipped to the image)")
    val_fraction: float = _f(0.1, "fraction of each training class held out for validation (model selection, early stopping)")
    split_seed: int = _f(0, "seed of the validation split")
    batch_size: int = _f(32, "images per step (before gradient accumulation)")
    workers: int = _f(max(1, min(8, (os.cpu_count() or 2) - 1)), "data loading processes (default: one core is left for the training step)")
    augment: str = _f("basic", "extra augmentation after crop+flip: none, basic, colorjitter, randaugment, trivialaugment")
    scale_min: float = _f(0.25, "smallest area fraction of RandomResizedCrop")
    cutmix: float = _f(0.0, "CutMix alpha (0 turns it off)")
    mixup: float = _f(0.0, "MixUp alpha (0 turns it off)")
    mix_prob: float = _f(0.5, "probability that a batch gets CutMix/MixUp when either is on")
    random_erase: float = _f(0.0, "random erasing probability per training image (Zhong et al. 2017; timm's --reprob): one "
                             "rectangle of 2-33%% of the image filled with noise, after normalisation (0 turns it off)")
    sampler: str = _f("random", "training order: random (each image once per epoch) or balanced (classes equally likely, with replacement)")
    pipeline: str = _f("auto", "where batches are decoded and augmented: cpu (per image, Pillow, in loader workers), "
                       "device (workers only read files or cache slices; decode with nvJPEG, crop/flip/jitter/normalise "
                       "whole batches on the GPU), or auto (device on CUDA, cpu otherwise)")
    cache: bool = _f(False, "decode and resize training images once into a memory-mapped cache (short side 1.15 x --img-size)")
    cache_dir: str = _f(os.path.join(os.path.expanduser("~"), ".cache", "finegrain"), "folder of decoded caches")
    mean: tuple[float, float, float] | None = _f(None, "normalisation mean; default: the backbone's pretrained config")
    std: tuple[float, float, float] | None = _f(None, "normalisation std; default: the backbone's pretrained config")

    def check(self) -> None:
        if not self.data:
            raise ValueError("no data given: pass --data PATH (an image folder, a CSV file or a benchmark root)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.img_size < 32:
            raise ValueError(f"--img-size must be at least 32, got {self.img_size}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        from finegrain.data.transforms import AUGMENTS

        if self.pipeline not in ("auto", "cpu", "device"):
            raise ValueError(f"--pipeline must be auto, cpu or device, got {self.pipeline!r}")
        if self.sampler not in ("random", "balanced"):
            raise ValueError(f"--sampler must be random or balanced, got {self.sampler!r}")
        AUGMENTS.check(self.augment, "--augment")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"--scale-min must be in (0, 1], got {self.scale_min}")
        if self.cutmix < 0 or self.mixup < 0:
            raise ValueError("--cutmix and --mixup are Beta alphas and must be >= 0")
        if not 0.0 <= self.random_erase <= 1.0:
            raise ValueError(f"--random-erase is a probability and must be in [0, 1], got {self.random_erase}")
        self._check_crop()

    def _check_crop(self) -> None:
        if self.crop not in ("none", "box"):
            raise ValueError(f"--crop must be none or box, got {self.crop!r}")
        if self.crop_margin < 0:
            raise ValueError(f"--crop-margin is a fraction of the box size per side and must be >= 0, got {self.crop_margin}")
        if self.crop == "box" and self.cache:
            raise ValueError("--cache stores whole decoded images, not box crops: drop --cache to train with --crop box")
        if self.crop == "box" and self.pipeline == "device":
            raise ValueError("the device pipeline decodes whole images on the GPU and cannot crop them to their boxes: "
                             "drop --pipeline device (or pass --pipeline cpu) to train with --crop box")


@dataclass
class ModelConfig:
    """The network: a timm backbone, the task (method) that trains it, and that task's own options.

    ``options`` holds the task's options (``TASKS.get(task).Options``, e.g. ``{"num_parts": 16}``
    for WS-DAN); only what every task shares is a field here. A dict is turned into the task's
    options dataclass by :meth:`check`.
    """

    backbone: str = _f("resnet50", "any timm model name (finegrain list-backbones, or timm.list_models())")
    pretrained: str = _f("hub", "'hub' (timm download), 'none', or a local .safetensors/.pth/.bin file")
    task: str = _f("supervised", "training task (method); see finegrain.TASKS")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    drop_path_rate: float = _f(0.0, "stochastic depth rate (backbones that support it)")
    options: Any = _f(None, "the task's own options (a dict or the task's Options dataclass)", cli=False)

    def check(self) -> None:
        from finegrain.tasks import TASKS, resolve_options

        TASKS.check(self.task, "--task")
        self.options = resolve_options(self.task, self.options)


@dataclass
class TrainConfig:
    """The optimisation recipe and where the run goes."""

    epochs: int = _f(30, "training epochs")
    optimizer: str = _f("adamw", "sgd, adamw, adam or rmsprop")
    lr: float = _f(5e-3, "learning rate of the head, for --batch-size 32 (scaled linearly with the effective batch)")
    backbone_lr_mult: float = _f(0.1, "the backbone's learning rate is lr times this")
    layer_decay: float = _f(1.0, "layer-wise learning-rate decay: the backbone layer i of L also gets this ** (L - 1 - i), "
                            "the stem least (timm's --layer-decay; 1 turns it off)")
    weight_decay: float = _f(0.05, "weight decay (not applied to norms and biases)")
    momentum: float = _f(0.9, "SGD/RMSprop momentum")
    warmup_epochs: float = _f(0.5, "linear warmup length in epochs, then cosine decay to zero")
    head_epochs: int = _f(0, "first train the new layers alone (classifier, the method's layers) for this many of the --epochs, "
                             "the pretrained backbone frozen, then all layers, each stage with its own warmup and cosine "
                             "(LP-FT, Kumar et al. 2022; the two steps of B-CNN, Lin et al. 2015); 0 turns it off")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    class_weights: str = _f("none", "re-weight the cross-entropy per class: none, inverse (1/count) or effective (Cui et al. 2019)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this value (0 turns it off)")
    accum_steps: int = _f(1, "gradient accumulation steps")
    ema: bool = _f(False, "keep an exponential moving average of the weights and evaluate it")
    ema_decay: float = _f(0.998, "EMA decay per optimizer step (the largest, with --ema-warmup)")
    ema_warmup: bool = _f(True, "grow the EMA decay as 1 - (1 + step)^(-2/3) up to --ema-decay (timm's EMA warmup), so a short "
                                "run's average is not mostly its starting weights")
    calibrate: bool = _f(True, "after training, fit the temperature and the open-set thresholds (95%% TPR) on the validation "
                         "split and store them, with a kNN bank of training features, in best.safetensors")
    amp: bool = _f(True, "bf16 autocast for training on GPU, and on CPUs with native bf16 (AVX512-BF16/AMX); prediction on CPU stays fp32")
    channels_last: bool = _f(True, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode: default, reduce-overhead (CUDA graphs: static shapes, less launch overhead), "
                           "max-autotune, or max-autotune-no-cudagraphs")
    patience: int = _f(0, "stop after this many epochs without validation improvement (0 turns it off)")
    select: str = _f("1se", "which epoch best.safetensors keeps: best (highest val top-1), last, or 1se (the latest epoch within one "
                     "binomial standard error of the highest: the one-standard-error rule, so the small split's noise does not pick "
                     "an early epoch; benchmarks/selection.py)")
    seed: int = _f(0, "seed of initialisation, shuffling and augmentation")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    out: str = _f("runs", "folder that holds run folders")
    name: str | None = _f(None, "run folder name (default: backbone-dataset-time)")
    resume: str | None = _f(None, "run folder or last checkpoint to continue exactly")
    wandb_project: str | None = _f(None, "also log each epoch to this Weights & Biases project (needs finegrain[track]; off when unset)")
    wandb_mode: str = _f("offline", "Weights & Biases mode: offline (files in the run folder; `wandb sync` later) or online")
    # adversarial training (finegrain.train.adversarial); eps and step size in 1/255 of the [0, 1] pixel range
    adv_attack: str = _f("none", "adversarial training: none, fgsm (Goodfellow et al. 2015), fast (FGSM from a random start, "
                         "Wong et al. 2020) or pgd (Madry et al. 2018); examples against the task's own logits, model in eval mode")
    adv_eps: float = _f(4.0, "adversarial L-inf radius in 1/255 of the pixel range (4: 4/255)")
    adv_steps: int = _f(7, "PGD steps of --adv-attack pgd")
    adv_step_size: float = _f(0.0, "step size in 1/255 for fast and pgd; 0: 1.25 eps (fast), 2.5 eps / steps (pgd)")
    adv_ratio: float = _f(0.5, "fraction of each batch replaced by adversarial examples (1: Madry et al.; 0.5: Goodfellow et al.)")

    def check(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        from finegrain.train.balance import CLASS_WEIGHTS
        from finegrain.train.optim import OPTIMIZERS

        OPTIMIZERS.check(self.optimizer, "--optimizer")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"--compile-mode must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, "
                             f"got {self.compile_mode!r}")
        if not 0 <= self.head_epochs <= self.epochs:
            raise ValueError(f"--head-epochs must be between 0 and --epochs ({self.epochs}), got {self.head_epochs}")
        if self.accum_steps < 1:
            raise ValueError(f"--accum-steps must be at least 1, got {self.accum_steps}")
        from finegrain.train.trainer import SELECT

        if self.select not in SELECT:
            raise ValueError(f"--select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.class_weights != "none":
            CLASS_WEIGHTS.check(self.class_weights, "--class-weights")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.ema and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        self._check_adversarial()

    def _check_adversarial(self) -> None:
        if self.adv_attack == "none":
            return
        from finegrain.train.adversarial import ATTACKS

        ATTACKS.check(self.adv_attack, "--adv-attack")
        if not 0 < self.adv_eps <= 255:
            raise ValueError(f"--adv-eps is in 1/255 of the pixel range and must be in (0, 255], got {self.adv_eps}")
        if not 0.0 < self.adv_ratio <= 1.0:
            raise ValueError(f"--adv-ratio must be in (0, 1], got {self.adv_ratio}")
        if self.adv_steps < 1:
            raise ValueError(f"--adv-steps must be at least 1, got {self.adv_steps}")
        if self.adv_step_size < 0 or (self.adv_step_size and self.adv_attack == "fgsm"):
            raise ValueError(f"--adv-step-size must be >= 0 and applies to fast and pgd (FGSM steps by eps), "
                             f"got {self.adv_step_size} with --adv-attack {self.adv_attack}")


@dataclass
class RunConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        self.data.check()
        self.model.check()
        self.train.check()
        if self.data.val_fraction == 0 and self.train.patience:
            raise ValueError("--patience needs a validation split: drop --patience or set --val-fraction > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config a ``to_dict`` (or a run's ``config.yaml``) describes.

        Task options may also be given the way earlier versions stored them, as flat ``model``
        fields named after their flags (``wsdan_parts: 16``); they are moved into ``options``.
        """

        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**values)

        return cls(
            data=build(DataConfig, d.get("data", {})),
            model=build(ModelConfig, options_from_flat(dict(d.get("model", {})))),
            train=build(TrainConfig, d.get("train", {})),
        )


def option_flags() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every task option flag (without ``--``) and the ``(task, field)`` pairs that declare it."""
    from finegrain.tasks import TASKS
    from finegrain.tasks.base import flag_name

    flags: dict[str, list] = {}
    for name in TASKS.names():
        for f in dataclasses.fields(TASKS.get(name).Options):
            flags.setdefault(flag_name(f), []).append((name, f))
    return flags


def task_choice(task: str) -> str:
    """How a user picks ``task`` on the command line: ``--task wsdan``, or ``--method maml`` for the few-shot methods."""
    from finegrain.tasks import TASKS

    cls = TASKS.get(task)
    return f"--method {cls.method}" if cls.trainer == "episodic" else f"--task {task}"


def options_from_flags(task: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``task`` from ``{flag: value}`` (flags without ``--``, with ``-`` or ``_``).

    A flag that belongs to other tasks only is refused, naming the tasks it applies to.
    """
    table = option_flags()
    out = {}
    for raw, value in given.items():
        flag = raw.replace("_", "-")
        owners = table.get(flag)
        if owners is None:
            raise ValueError(f"unknown task option --{flag}")
        mine = [f for t, f in owners if t == task]
        if not mine:
            tasks = sorted({t for t, _ in owners})
            raise ValueError(f"--{flag} only applies to {' or '.join(task_choice(t) for t in tasks)} (got {task_choice(task)}); "
                             f"add {task_choice(tasks[0])}, or drop --{flag}")
        out[mine[0].name] = value
    return out


def options_from_flat(model: dict) -> dict:
    """Move flat task-option fields of a ``model`` dict (older ``config.yaml`` files) into ``options``."""
    shared = {f.name for f in dataclasses.fields(ModelConfig)}
    flat = {k: model.pop(k) for k in list(model) if k not in shared}
    if not flat:
        return model
    task = model.get("task", "supervised")
    defaults = {flag: fields[0][1].default for flag, fields in option_flags().items()}
    # an old file stores every flat field; only those that differ from their default say anything
    said = {k: v for k, v in flat.items()
            if v is not None and defaults.get(k.replace("_", "-"), object()) != (tuple(v) if isinstance(v, list) else v)}
    options = dict(model.get("options") or {})
    options.update(options_from_flags(task, said))
    model["options"] = options
    return model

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


@dataclass
class DataConfig:
    """Where the images are and how they are read and augmented."""

    data: str = _f("", "image folder, CSV file or benchmark root")
    dataset: str | None = _f(None, "reader name (folder, csv, cub, nabirds, dogs, cars, aircraft, flowers102); guessed from --data if unset")
    download: bool = _f(False, "download the benchmark into --data if it is missing (needs internet)")
    img_size: int = _f(448, "training and evaluation crop size in pixels")
    val_fraction: float = _f(0.1, "fraction of each training class held out for validation (model selection, early stopping)")
    split_seed: int = _f(0, "seed of the validation split")
    batch_size: int = _f(32, "images per step (before gradient accumulation)")
    workers: int = _f(max(1, min(8, (os.cpu_count() or 2) - 1)), "data loading processes (default: one core is left for the training step)")
    augment: str = _f("basic", "extra augmentation after crop+flip: none, basic, colorjitter, randaugment, trivialaugment")
    scale_min: float = _f(0.25, "smallest area fraction of RandomResizedCrop")
    cutmix: float = _f(0.0, "CutMix alpha (0 turns it off)")
    mixup: float = _f(0.0, "MixUp alpha (0 turns it off)")
    mix_prob: float = _f(0.5, "probability that a batch gets CutMix/MixUp when either is on")
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
        if self.pipeline not in ("auto", "cpu", "device"):
            raise ValueError(f"--pipeline must be auto, cpu or device, got {self.pipeline!r}")
        if self.sampler not in ("random", "balanced"):
            raise ValueError(f"--sampler must be random or balanced, got {self.sampler!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"--scale-min must be in (0, 1], got {self.scale_min}")
        if self.cutmix < 0 or self.mixup < 0:
            raise ValueError("--cutmix and --mixup are Beta alphas and must be >= 0")


AUGMENTS = ("none", "basic", "colorjitter", "randaugment", "trivialaugment")


@dataclass
class ModelConfig:
    """The network: a timm backbone and the task that trains it."""

    backbone: str = _f("resnet50", "any timm model name (finegrain list-backbones, or timm.list_models())")
    pretrained: str = _f("hub", "'hub' (timm download), 'none', or a local .safetensors/.pth/.bin file")
    task: str = _f("supervised", "training task (method); see finegrain.TASKS")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    drop_path_rate: float = _f(0.0, "stochastic depth rate (backbones that support it)")
    teacher: str | None = _f(None, "distillation (--task distill): the teacher checkpoint")
    kd_temperature: float = _f(4.0, "distillation temperature")
    kd_alpha: float = _f(0.7, "weight of the distillation term (1 - alpha for cross-entropy)")
    kd_feature_weight: float = _f(0.0, "weight of feature distillation (0 turns it off)")
    attention: str = _f("none", "attention on the last feature map (--task fgvc): none, se, cbam, dual, deform")
    pooling: str = _f("avg", "global pooling (--task fgvc): avg, bilinear, compact_bilinear, netvlad")
    loss: str = _f("ce", "loss terms name[:weight] joined by '+' (--task fgvc): ce, focal, center, triplet; e.g. ce+center:0.01+triplet:1.0")
    reduce_dim: int = _f(0, "1x1 conv to this many channels before attention and pooling (--task fgvc; 0 turns it off)")
    pool_dim: int = _f(0, "compact_bilinear: output size (0: 8192); netvlad: number of centres (0: 16) (--task fgvc)")
    wsdan_parts: int = _f(32, "number of attention maps M (--task wsdan)")
    transfg_contrastive_weight: float = _f(1.0, "weight of the contrastive loss on the class token (--task transfg; 0 turns it off)")
    transfg_margin: float = _f(0.4, "cosine margin of the contrastive loss for pairs of different classes (--task transfg)")
    racnn_scales: int = _f(3, "number of scales, each zooming into the previous one (--task racnn): 2 or 3")
    racnn_margin: float = _f(0.05, "margin of the inter-scale ranking loss (--task racnn)")
    racnn_shared_backbone: bool = _f(True, "one backbone for all scales (--task racnn); --no-racnn-shared-backbone gives each scale a copy")
    parts_groups: str = _f("cub4", "CUB parts that make the part crops (--task parts): cub2, cub4, cub6, cub15, or 'name=id,id;name=id'")
    parts_num: int = _f(4, "number of attention parts K (--task parts-weak)")
    parts_pool: str = _f("concat", "how object and part crop features are combined (--task parts, parts-weak): concat or mil (attention MIL pooling)")
    parts_size: float = _f(0.4, "part crop side as a fraction of the object box's (parts) or the image's (parts-weak) longer side")
    kd_attention_weight: float = _f(0.0, "weight of attention transfer from the teacher's stage feature maps (--task distill; 0 turns it off)")

    def check(self) -> None:
        from finegrain.models.attention import ATTENTIONS
        from finegrain.models.losses import parse_loss_spec
        from finegrain.models.pooling import POOLINGS

        for flag, value, registry in (("--attention", self.attention, ATTENTIONS), ("--pooling", self.pooling, POOLINGS)):
            if value not in registry:
                raise ValueError(f"{flag} must be one of {', '.join(registry.names())}, got {value!r}")
        parse_loss_spec(self.loss)
        if self.reduce_dim < 0 or self.pool_dim < 0:
            raise ValueError(f"--reduce-dim and --pool-dim must be >= 0, got {self.reduce_dim} and {self.pool_dim}")
        if self.wsdan_parts < 1:
            raise ValueError(f"--wsdan-parts must be at least 1, got {self.wsdan_parts}")
        if self.racnn_scales not in (2, 3):
            raise ValueError(f"--racnn-scales must be 2 or 3, got {self.racnn_scales}")
        if self.parts_num < 1:
            raise ValueError(f"--parts-num must be at least 1, got {self.parts_num}")
        if self.parts_pool not in ("concat", "mil"):
            raise ValueError(f"--parts-pool must be concat or mil, got {self.parts_pool!r}")
        if not 0 < self.parts_size <= 1:
            raise ValueError(f"--parts-size must be in (0, 1], got {self.parts_size}")
        if self.kd_attention_weight < 0 or self.transfg_contrastive_weight < 0:
            raise ValueError("--kd-attention-weight and --transfg-contrastive-weight must be >= 0")
        from finegrain.tasks.parts import parse_part_groups

        parse_part_groups(self.parts_groups)
        defaults = ModelConfig.__dataclass_fields__
        for tasks, names in _TASK_FLAGS:
            given = [f"--{n.replace('_', '-')}" for n in names if getattr(self, n) != defaults[n].default]
            if given and self.task not in tasks:
                raise ValueError(f"{', '.join(given)} only apply to {' or '.join(f'--task {t}' for t in tasks)} (got --task "
                                 f"{self.task}); add --task {tasks[0]}, or drop {', '.join(given)}")


_TASK_FLAGS = (  # ModelConfig fields that only one family of tasks reads
    (("fgvc",), ("attention", "pooling", "loss", "reduce_dim", "pool_dim")),
    (("wsdan",), ("wsdan_parts",)),
    (("transfg",), ("transfg_contrastive_weight", "transfg_margin")),
    (("racnn",), ("racnn_scales", "racnn_margin", "racnn_shared_backbone")),
    (("parts",), ("parts_groups",)),
    (("parts-weak",), ("parts_num",)),
    (("parts", "parts-weak"), ("parts_pool", "parts_size")),
    (("distill",), ("kd_attention_weight",)),
)


@dataclass
class TrainConfig:
    """The optimisation recipe and where the run goes."""

    epochs: int = _f(30, "training epochs")
    optimizer: str = _f("adamw", "sgd, adamw, adam or rmsprop")
    lr: float = _f(5e-3, "learning rate of the head, for --batch-size 32 (scaled linearly with the effective batch)")
    backbone_lr_mult: float = _f(0.1, "the backbone's learning rate is lr times this")
    weight_decay: float = _f(0.05, "weight decay (not applied to norms and biases)")
    momentum: float = _f(0.9, "SGD/RMSprop momentum")
    warmup_epochs: float = _f(0.5, "linear warmup length in epochs, then cosine decay to zero")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    class_weights: str = _f("none", "re-weight the cross-entropy per class: none, inverse (1/count) or effective (Cui et al. 2019)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this value (0 turns it off)")
    accum_steps: int = _f(1, "gradient accumulation steps")
    ema: bool = _f(False, "keep an exponential moving average of the weights and evaluate it")
    ema_decay: float = _f(0.998, "EMA decay per optimizer step")
    amp: bool = _f(True, "bf16 autocast for training on GPU, and on CPUs with native bf16 (AVX512-BF16/AMX); prediction on CPU stays fp32")
    channels_last: bool = _f(True, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode: default, reduce-overhead (CUDA graphs: static shapes, less launch overhead), "
                           "max-autotune, or max-autotune-no-cudagraphs")
    patience: int = _f(0, "stop after this many epochs without validation improvement (0 turns it off)")
    seed: int = _f(0, "seed of initialisation, shuffling and augmentation")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    out: str = _f("runs", "folder that holds run folders")
    name: str | None = _f(None, "run folder name (default: backbone-dataset-time)")
    resume: str | None = _f(None, "run folder or last checkpoint to continue exactly")
    wandb_project: str | None = _f(None, "also log each epoch to this Weights & Biases project (needs finegrain[track]; off when unset)")
    wandb_mode: str = _f("offline", "Weights & Biases mode: offline (files in the run folder; `wandb sync` later) or online")

    def check(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"--compile-mode must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, "
                             f"got {self.compile_mode!r}")
        if self.accum_steps < 1:
            raise ValueError(f"--accum-steps must be at least 1, got {self.accum_steps}")
        if self.class_weights not in ("none", "inverse", "effective"):
            raise ValueError(f"--class-weights must be none, inverse or effective, got {self.class_weights!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")


OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")


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
    def from_dict(cls, d: dict) -> "RunConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**values)

        return cls(
            data=build(DataConfig, d.get("data", {})),
            model=build(ModelConfig, d.get("model", {})),
            train=build(TrainConfig, d.get("train", {})),
        )

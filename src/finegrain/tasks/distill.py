"""Knowledge distillation: a small student learns from a trained teacher checkpoint.

Soft targets with temperature follow Hinton et al., "Distilling the Knowledge in a Neural
Network" (arXiv:1503.02531); the optional feature term regresses the student's pooled features,
through a linear projection, onto the teacher's (FitNets, Romero et al., arXiv:1412.6550).

The optional attention transfer term follows "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (Zagoruyko and Komodakis,
ICLR 2017, arXiv:1612.03928): the spatial attention map of a stage, ``Q = mean_c A_c^2``
flattened and L2-normalised, of the student's last stages is pulled towards the teacher's
matching stages (``mean (Q_s - Q_t)^2`` as in the authors' code; a student map of another size
is resized bilinearly to the teacher's first). The authors' ``beta = 1000`` with their
``beta / 2`` factor is ``--kd-attention-weight 500``.

The teacher is frozen, in eval mode, and is neither saved in the student's checkpoints nor
given to the optimizer. A best checkpoint is a plain supervised model: predicting with it
needs no teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.tasks.base import TASKS, BuildContext, LoadedCheckpoint, Task, TaskOptions, option, require_classifier
from finegrain.tasks.supervised import soft_cross_entropy


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Attention transfer's spatial map ``[B, h, w]``: ``mean_c A_c^2`` (before normalisation)."""
    return features.float().pow(2).mean(1)


def attention_transfer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j mean (normalize(Q_s^j) - normalize(Q_t^j))^2`` over matching stages ``[B, C, h, w]``.

    A student map of another size than the teacher's is resized (bilinear) to the teacher's.
    """
    total = 0.0
    for fs, ft in zip(student, teacher, strict=True):
        qs, qt = attention_map(fs), attention_map(ft)
        if qs.shape[-2:] != qt.shape[-2:]:
            qs = F.interpolate(qs[:, None], size=qt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        total = total + (F.normalize(qs.flatten(1), dim=1) - F.normalize(qt.flatten(1), dim=1)).pow(2).mean()
    return total


def stage_features(model: nn.Module, images: torch.Tensor, stages: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(forward_features(images), the last ``stages`` stage maps [B, C, h, w])`` in one pass."""
    final, inter = model.forward_intermediates(images, indices=stages)
    return final, list(inter)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                    reduction="batchmean", log_target=True) * t * t


@dataclass
class DistillOptions(TaskOptions):
    teacher: str = option("", "the teacher checkpoint (a file or run folder)", flag="teacher")
    temperature: float = option(4.0, "distillation temperature", flag="kd-temperature")
    alpha: float = option(0.7, "weight of the distillation term (1 - alpha for cross-entropy)", flag="kd-alpha")
    feature_weight: float = option(0.0, "weight of feature distillation (0 turns it off)", flag="kd-feature-weight")
    attention_weight: float = option(0.0, "weight of attention transfer from the teacher's stage feature maps (0 turns it off)",
                                     flag="kd-attention-weight")

    def check(self) -> None:
        if not self.teacher:
            raise ValueError("distillation needs a teacher checkpoint: pass --teacher PATH")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError(f"--kd-temperature must be > 0 and --kd-alpha in [0, 1], got {self.temperature} and {self.alpha}")
        if self.feature_weight < 0 or self.attention_weight < 0:
            raise ValueError("--kd-feature-weight and --kd-attention-weight must be >= 0")


@TASKS.register("distill")
class DistillTask(Task):
    """Student = ``model``; loss = (1 - alpha) CE + alpha KD (+ feature_weight * feature MSE).

    Args:
        teacher: the trained teacher (a :class:`LoadedCheckpoint` with the same classes;
            :func:`finegrain.checkpoint.build_task` opens it from a path).
        temperature: softening temperature T.
        alpha: weight of the distillation term.
        feature_weight: weight of the feature regression term (0 turns it off).
        attention_weight: weight of the attention transfer term (0 turns it off).
        attention_stages: number of last stages whose attention maps are matched.
        student_mean, student_std: normalisation of the student's inputs; the teacher's inputs are
            re-normalised to its own mean and std.
    """

    name = "distill"
    inference_name = "supervised"
    Options = DistillOptions
    checkpoint_args = ("teacher",)

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0,
                 teacher: LoadedCheckpoint | None = None, temperature: float = 4.0, alpha: float = 0.7,
                 feature_weight: float = 0.0, attention_weight: float = 0.0, attention_stages: int = 3,
                 student_mean=(0.485, 0.456, 0.406), student_std=(0.229, 0.224, 0.225)):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        if not isinstance(teacher, LoadedCheckpoint):
            raise ValueError("distillation needs a teacher checkpoint: pass --teacher PATH (in Python, build the task with "
                             "finegrain.checkpoint.build_task, which opens it)")
        teacher_task, meta, teacher = teacher.task, teacher.meta, teacher.path
        require_classifier(teacher_task, "distillation's teacher")
        if meta["num_classes"] != num_classes:
            raise ValueError(f"teacher {teacher} has {meta['num_classes']} classes, the data has {num_classes}; "
                             "distil on the data set the teacher was trained on")
        for p in teacher_task.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher_task.eval())  # not a submodule: not saved, not optimised
        self.teacher_classes = meta["classes"]
        self.args = {"teacher": str(teacher), "temperature": temperature, "alpha": alpha, "feature_weight": feature_weight,
                     "student_mean": list(student_mean), "student_std": list(student_std)}
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        self.attention_weight, self.attention_stages = attention_weight, attention_stages
        if attention_weight > 0:
            self.args.update(attention_weight=attention_weight, attention_stages=attention_stages)
            for who, net in (("student", model), ("teacher", teacher_task.model)):
                if not hasattr(net, "forward_intermediates") or len(getattr(net, "feature_info", [])) < attention_stages:
                    raise ValueError(f"--kd-attention-weight needs a {who} backbone with at least {attention_stages} "
                                     f"stages and timm's forward_intermediates (resnet, efficientnet, convnext, vit, ...); "
                                     f"{type(net).__name__} has none: drop --kd-attention-weight or pick such a backbone")
        tp = meta["preprocessing"]
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std, folded into one scale and shift
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(tp["mean"]), torch.tensor(tp["std"])
        self.register_buffer("t_scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        if feature_weight > 0:
            self.feature_proj = nn.Linear(model.num_features, teacher_task.model.num_features)

    @classmethod
    def build_args(cls, options, context: BuildContext):
        prep = context.preprocessing or {}
        return {**super().build_args(options, context), "student_mean": prep.get("mean", (0.485, 0.456, 0.406)),
                "student_std": prep.get("std", (0.229, 0.224, 0.225))}

    def _apply(self, fn, *args, **kwargs):
        self.teacher._apply(fn, *args, **kwargs)  # follow .to(device) / channels_last
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics and dropout stay frozen
        return self

    @torch.no_grad()
    def teacher_outputs(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """``(teacher logits, backbone features or None, stage maps)`` on teacher-normalised images.

        The logits are the teacher task's own prediction (``predict``: WS-DAN's crops, TransFG's
        part selection, ...); the features, needed only by the feature and attention terms, are
        its backbone's. A plain teacher shares one backbone pass between the two.
        """
        at, want = self.attention_weight > 0, self.attention_weight > 0 or self.feature_weight > 0
        net = self.teacher.model
        plain = type(self.teacher).infer is Task.infer and self.teacher.outputs == "classes"
        if not want:
            return self.teacher.predict(xt), None, []
        feats, stages = stage_features(net, xt, self.attention_stages) if at else (net.forward_features(xt), [])
        logits = net.forward_head(feats) if plain else self.teacher.predict(xt)
        return logits, feats, stages

    def forward(self, batch):
        x = batch["image"]
        at = self.attention_weight > 0
        feats, s_stages = stage_features(self.model, x, self.attention_stages) if at else (self.model.forward_features(x), [])
        logits = self.model.forward_head(feats)
        t_logits, t_feats, t_stages = self.teacher_outputs(x * self.t_scale + self.t_shift)
        target = batch.get("target", batch["label"])
        ce = soft_cross_entropy(logits, target, self.label_smoothing)
        kd = kd_loss(logits, t_logits, self.temperature)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        out = {"logits": logits, "ce": ce.detach(), "kd": kd.detach()}
        if self.feature_weight > 0:
            s_pre = self.model.forward_head(feats, pre_logits=True)
            t_pre = self.teacher.model.forward_head(t_feats, pre_logits=True)
            feat = F.mse_loss(self.feature_proj(s_pre.float()), t_pre.float())
            loss = loss + self.feature_weight * feat
            out["feature"] = feat.detach()
        if at:
            att = attention_transfer_loss(s_stages, t_stages)
            loss = loss + self.attention_weight * att
            out["attention"] = att.detach()
        out["loss"] = loss
        return out

    def task_args(self):
        return dict(self.args)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights only, loadable into a plain supervised task."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("model.")}

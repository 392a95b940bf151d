"""L-inf adversarial examples (FGSM, FGSM from a random start, PGD) and adversarial training.

- Towards Deep Learning Models Resistant to Adversarial Attacks (Madry et al., arXiv:1706.06083):
  projected gradient descent (PGD) from a random start in the eps ball, and training on its examples.
- Explaining and Harnessing Adversarial Examples (Goodfellow et al., arXiv:1412.6572): the fast
  gradient sign method (FGSM), ``x + eps * sign(grad_x loss)``, and batches mixed half clean, half
  adversarial.
- Fast is better than free: Revisiting adversarial training (Wong et al., arXiv:2001.03994): FGSM
  from a uniform random start with step ``1.25 eps`` ("fast").

Attacks work in pixel space: images in ``[0, 1]`` as the eval crop (or the training augmentation)
left them, before normalisation, with ``eps`` in the same units (``4 / 255``); every iterate is
clamped to ``[0, 1]``. The loss is the cross-entropy of :meth:`Task.infer`, the task's own
inference path, so every classifier task is attacked the same way whatever its training loss.
The model is put in eval mode while the attack runs, as Madry et al.'s ``robustness`` library does
(``AttackerModel.forward``): BatchNorm statistics and training-only state (WS-DAN's feature
centres) are not touched by the attack's passes, and dropout does not make the gradient noisy.
Only the images are differentiated (``torch.autograd.grad``), so nothing accumulates into the
weights' ``.grad`` (accumulation steps in flight are left as they were).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(pixel images [B, 3, H, W] in [0, 1], target [B] or [B, C]) -> loss per image [B]``."""


@dataclass(frozen=True)
class Attack:
    """An L-inf attack: ``steps`` signed-gradient steps of ``step_size`` from the image (or from a
    uniform random point of the eps ball), each projected back into the ball and into ``[0, 1]``.

    Attributes:
        name: the registered attack (``fgsm``, ``fast``, ``pgd``).
        eps: radius in pixel units (``4 / 255``).
        steps: gradient steps.
        step_size: size of each step in pixel units.
        random_start: start from ``x + U(-eps, eps)`` instead of ``x``.
        keep_best: return, per image, the iterate with the highest loss (start and final included)
            instead of the last one (the ``use_best`` of Madry et al.'s library; for evaluation).
    """

    name: str
    eps: float
    steps: int
    step_size: float
    random_start: bool
    keep_best: bool = False

    def settings(self) -> dict:
        """What a results file records about the attack (pixel units, plus eps and step in 1/255)."""
        return {**dataclasses.asdict(self), "norm": "linf", "eps_255": self.eps * 255, "step_size_255": self.step_size * 255}


ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")


@ATTACKS.register("fgsm")
def fgsm(eps: float, *, steps: int = 1, step_size: float = 0.0, keep_best: bool = False) -> Attack:
    """One step of ``eps`` from the image (Goodfellow et al.); ``steps`` and ``step_size`` must stay unset."""
    if steps != 1 or step_size:
        raise ValueError("FGSM is one step of size eps from the image: drop the step count and step size, "
                         "or use pgd (several steps) or fast (a random start)")
    return Attack("fgsm", eps, 1, eps, False, keep_best)


@ATTACKS.register("fast")
def fast(eps: float, *, steps: int = 1, step_size: float = 0.0, keep_best: bool = False) -> Attack:
    """FGSM from a uniform random start, step ``1.25 eps`` unless given (Wong et al.)."""
    if steps != 1:
        raise ValueError(f"the fast attack takes one step, got {steps}; use pgd for several")
    return Attack("fast", eps, 1, step_size or 1.25 * eps, True, keep_best)


@ATTACKS.register("pgd")
def pgd(eps: float, *, steps: int = 7, step_size: float = 0.0, keep_best: bool = False) -> Attack:
    """PGD from a random start; step ``2.5 eps / steps`` unless given (Madry et al.'s library default)."""
    if steps < 1:
        raise ValueError(f"PGD needs at least one step, got {steps}")
    return Attack("pgd", eps, steps, step_size or 2.5 * eps / steps, True, keep_best)


def make_attack(name: str, eps: float, **kwargs) -> Attack:
    """The registered attack ``name`` at radius ``eps`` (pixel units); ``kwargs`` as the builders take them."""
    if not eps > 0:
        raise ValueError(f"the attack radius must be positive, got {eps}")
    return ATTACKS.get(name)(eps, **kwargs)


def linf_attack(loss_fn: LossFn, images: torch.Tensor, target: torch.Tensor, attack: Attack, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial versions of pixel ``images`` (``[0, 1]``): ascend ``loss_fn`` under ``attack``.

    With one step, no random start and ``step_size == eps`` this is FGSM; with several steps and a
    random start it is Madry et al.'s PGD. The random start draws from ``generator`` (the global
    RNG when None, which the trainer saves and restores, so a resumed run draws the same).
    """
    x0, eps = images.detach(), attack.eps
    lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    x = x0.clone()
    if attack.random_start:
        x = torch.min(torch.max(x0 + torch.empty_like(x0).uniform_(-eps, eps, generator=generator), lo), hi)
    best = best_loss = None
    with torch.enable_grad():
        for _ in range(attack.steps):
            x.requires_grad_(True)
            loss = loss_fn(x, target)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            with torch.no_grad():
                if attack.keep_best:
                    best, best_loss = _keep_best(best, best_loss, x, loss)
                x = torch.min(torch.max(x + attack.step_size * grad.sign(), lo), hi)
    if attack.keep_best:
        with torch.no_grad():
            x, _ = _keep_best(best, best_loss, x, loss_fn(x, target))
    return x.detach()


def _keep_best(best, best_loss, x, loss):
    """Per image, the iterate with the higher loss so far (a tie keeps the earlier one)."""
    x, loss = x.detach(), loss.detach().float()
    if best is None:
        return x.clone(), loss.clone()
    better = loss > best_loss
    return torch.where(better[:, None, None, None], x, best), torch.where(better, loss, best_loss)


def per_image_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``[B]`` against hard ``[B]`` or soft ``[B, C]`` (CutMix/MixUp) targets, in float32."""
    logits = logits.float()
    if target.dim() == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return -(target.float() * F.log_softmax(logits, dim=1)).sum(1)


def classifier_loss(task: nn.Module, mean: Sequence[float], std: Sequence[float]) -> LossFn:
    """The attack's loss on ``task``: cross-entropy of ``task.infer`` on the normalised pixel images."""
    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m, s = _stats(mean, std, x)
        return per_image_cross_entropy(task.infer((x - m) / s), target)

    return loss


def _stats(mean, std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return m, s


def adversarial_images(task: nn.Module, images: torch.Tensor, target: torch.Tensor, attack: Attack, *,
                       mean: Sequence[float], std: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial versions of normalised ``images`` (as the model takes them), normalised the same way.

    The images are taken back to pixels with ``mean``/``std``, attacked there (eps in pixel units,
    clamped to ``[0, 1]``) with ``task`` in eval mode, and normalised again; the task's mode is
    restored afterwards.
    """
    m, s = _stats(mean, std, images)
    pixels = (images.detach().float() * s.float() + m.float()).clamp(0, 1)
    was_training = task.training
    task.eval()
    try:
        adv = linf_attack(classifier_loss(task, mean, std), pixels, target, attack, generator=generator)
    finally:
        task.train(was_training)
    return ((adv - m.float()) / s.float()).to(images.dtype)


@dataclass(frozen=True)
class AdversarialTraining:
    """Replace a fraction of each training batch by adversarial examples of the model being trained.

    ``ratio`` 1 is Madry et al.'s training (adversarial examples only); 0.5 is Goodfellow et al.'s
    even mix. The first ``round(ratio x batch)`` images (at least one) of each batch are replaced;
    batches are already in a seeded random order. Labels (and CutMix/MixUp targets) stay with
    their images.

    Attributes:
        attack: the attack, in pixel units.
        ratio: fraction of each batch replaced, in (0, 1].
        mean, std: the batch's normalisation (``StepConfig.normalize``).
    """

    attack: Attack
    ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def count(self, batch: int) -> int:
        """How many images of a batch of ``batch`` are replaced."""
        return min(batch, max(1, round(self.ratio * batch)))

    def __call__(self, task: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``images`` (normalised) with their first :meth:`count` replaced by adversarial versions."""
        if not torch.is_tensor(images):
            raise TypeError(f"adversarial training needs batches of equal-sized images, got a {type(images).__name__} "
                            "of images (a task that takes lists of images): train it without --adv-attack")
        k = self.count(len(images))
        adv = adversarial_images(task, images[:k], target[:k], self.attack, mean=self.mean, std=self.std)
        out = torch.cat([adv, images[k:]])
        channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def adversarial_training(cfg, task: nn.Module, normalize: tuple | None) -> AdversarialTraining | None:
    """The ``--adv-*`` flags of a ``TrainConfig`` as the step's :class:`AdversarialTraining` (None with ``--adv-attack none``).

    Refuses a task that does not predict classes (few-shot methods), naming the supported tasks.
    """
    if cfg.adv_attack == "none":
        return None
    from finegrain.tasks.base import require_classifier

    require_classifier(task, f"--adv-attack {cfg.adv_attack}")
    if normalize is None:
        raise ValueError("adversarial training attacks pixels and needs the batch's normalisation: pass normalize=(mean, std)")
    kwargs = {"steps": cfg.adv_steps} if cfg.adv_attack == "pgd" else {}
    if cfg.adv_step_size:
        kwargs["step_size"] = cfg.adv_step_size / 255
    attack = make_attack(cfg.adv_attack, cfg.adv_eps / 255, **kwargs)
    return AdversarialTraining(attack, cfg.adv_ratio, tuple(normalize[0]), tuple(normalize[1]))

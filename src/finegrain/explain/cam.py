"""Class activation maps and attention rollout: where in the image the model looks.

Implements
  * Grad-CAM: "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    Selvaraju et al., arXiv:1610.02391.
  * Grad-CAM++: "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks",
    Chattopadhay et al., arXiv:1710.11063.
  * Attention rollout: "Quantifying Attention Flow in Transformers", Abnar & Zuidema,
    arXiv:2005.00928.

All three take a Task and explain its own logits (``Task.infer``, the numbers ``predict``
returns), whatever the method on top of the backbone; each returns one map per image at the
model's input resolution (the eval crop), scaled to ``[0, 1]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from finegrain.checkpoint import atomic_write
from finegrain.registry import Registry

CamFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
METHODS: Registry[CamFn] = Registry("explanation method")


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``[B, H, W]`` to ``[0, 1]``; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(1e-12)
    out[(hi - lo).squeeze(1) < 1e-12] = 0.0
    return out.view_as(maps)


def _as_grid(model: nn.Module, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Feature maps as ``[B, C, h, w]``; ViT-style tokens ``[B, N, C]`` are reshaped to their patch grid."""
    if feats.ndim == 4:
        return feats
    if feats.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = feats[:, prefix:]
        h, w = _patch_grid(model, image_hw, tokens.shape[1])
        return tokens.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], h, w)
    raise ValueError(f"cannot build a class activation map from features of shape {tuple(feats.shape)}; "
                     "expected [B, C, H, W] (CNN) or [B, tokens, C] (ViT)")


def _patch_grid(model: nn.Module, image_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is not None:
        ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
        h, w = image_hw[0] // ps[0], image_hw[1] // ps[1]
        if h * w == n_tokens:
            return h, w
    side = int(round(n_tokens ** 0.5))
    if side * side != n_tokens:
        raise ValueError(f"cannot arrange {n_tokens} patch tokens into a grid")
    return side, side


class _FeatureTap:
    """Context manager that turns the first feature map a task computes into a leaf with a gradient.

    The tapped output is ``task.model.forward_features`` (or the submodule named by the task's
    ``cam_layer``, e.g. TransFG's token sequence before part selection). Only the first call is
    tapped: for tasks that run the backbone again on crops (WS-DAN, RA-CNN, the part models),
    that is the pass over the whole image. Replacing it by a detached leaf means no parameter
    gradients are built or stored, whether the backbone is frozen or not.
    """

    def __init__(self, task: nn.Module):
        self.task, self.first = task, None

    def _take(self, out: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            return out
        self.first = out.detach().requires_grad_(True)
        return self.first

    def __enter__(self) -> _FeatureTap:
        layer = getattr(self.task, "cam_layer", None)
        model = self.task.model
        if layer:
            self._hook = self.task.get_submodule(layer).register_forward_hook(lambda m, i, o: self._take(o))
        else:
            original = model.forward_features
            self._hook = None
            model.forward_features = lambda *a, **k: self._take(original(*a, **k))
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
        else:
            del self.task.model.forward_features  # the instance attribute set above; the method shows again


def _features_and_grads(task: nn.Module, x: torch.Tensor, target: torch.Tensor | None):
    """Feature map ``A`` (grid form), ``dS/dA`` for the target class score ``S``, and the task's logits.

    ``S`` is a logit of ``task.infer`` (the numbers ``predict`` returns), differentiated with
    respect to the first feature map the task computes (see :class:`_FeatureTap`).
    """
    with _FeatureTap(task) as tap, torch.enable_grad():
        logits = task.infer(x)
        if tap.first is None:
            raise ValueError(f"task {getattr(task, 'name', type(task).__name__)} computed no feature map to explain")
        cls = logits.argmax(1) if target is None else target.to(logits.device)
        if int(cls.max()) >= logits.shape[1] or int(cls.min()) < 0:
            raise ValueError(f"target class {int(cls.max())} out of range for {logits.shape[1]} classes")
        score = logits.gather(1, cls.view(-1, 1)).sum()  # samples are independent in eval mode
        if not score.requires_grad:
            raise ValueError("the class scores do not depend on the feature map; nothing to explain")
        (grad,) = torch.autograd.grad(score, tap.first, allow_unused=True)
    feats = tap.first.detach()
    grad = torch.zeros_like(feats) if grad is None else grad
    hw = tuple(x.shape[-2:])
    return _as_grid(task.model, feats, hw), _as_grid(task.model, grad, hw), logits.detach()


@METHODS.register("gradcam")
def grad_cam(task: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (arXiv:1610.02391): ReLU of the feature maps weighted by their mean gradient.

    Args:
        task: a Task in eval mode; its ``infer`` gives the class scores.
        x: input batch ``[B, 3, H, W]`` (already normalised).
        target: class index per image; None explains the predicted class.

    Returns:
        ``(maps [B, H, W] in [0, 1], logits [B, C])``.
    """
    acts, grads, logits = _features_and_grads(task, x, target)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    return _upsample(cam, x), logits


@METHODS.register("gradcampp")
def grad_cam_pp(task: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM++ (arXiv:1710.11063, eq. 19 with the exponential of the class score).

    Channel weights sum the positive gradients weighted by per-pixel coefficients
    ``alpha = g^2 / (2 g^2 + sum(A) g^3)``, so several instances of a class all count, rather
    than the largest one dominating as with a plain average. Same arguments and return value as
    :func:`grad_cam`.
    """
    acts, grads, logits = _features_and_grads(task, x, target)
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    return _upsample(cam, x), logits


def _upsample(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _normalise(cam[:, 0])


class _AttentionRecorder:
    """Context manager that makes every timm ``Attention`` module keep its softmax probabilities.

    Fused attention (``scaled_dot_product_attention``) never materialises them, so it is switched
    off while recording and restored afterwards; the probabilities are read from ``attn_drop``,
    which is the identity in eval mode.
    """

    def __init__(self, model: nn.Module):
        blocks = getattr(model, "blocks", None)
        self.attns = [b.attn for b in blocks if hasattr(b, "attn") and hasattr(b.attn, "attn_drop")] if blocks is not None else []
        if not self.attns:
            raise ValueError(f"{type(model).__name__} has no transformer blocks with timm Attention modules; "
                             "attention rollout needs a ViT (use --method gradcam for CNNs)")
        self.maps: list[torch.Tensor] = []

    def __enter__(self) -> _AttentionRecorder:
        self._fused = [getattr(a, "fused_attn", False) for a in self.attns]
        self._hooks = []
        for a in self.attns:
            a.fused_attn = False
            self._hooks.append(a.attn_drop.register_forward_hook(lambda m, i, o: self.maps.append(o.detach())))
        return self

    def __exit__(self, *exc) -> None:
        for a, fused, h in zip(self.attns, self._fused, self._hooks):
            a.fused_attn = fused
            h.remove()


@METHODS.register("rollout")
def attention_rollout(task: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, *,
                      head_fusion: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rollout (arXiv:2005.00928) from the class token to the patches.

    The logits are the task's own (``task.infer``). Each layer's head-fused attention gets the residual connection added (``0.5 A + 0.5 I``),
    rows are renormalised, and the layers are multiplied from first to last. The map is
    class-agnostic: ``target`` is accepted for a uniform signature and ignored.

    Args:
        head_fusion: "mean", "max" or "min" over heads.

    Returns:
        ``(maps [B, H, W] in [0, 1], logits [B, C])``.
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    model = task.model
    with _AttentionRecorder(model) as rec, torch.no_grad():
        logits = task.infer(x)
    if not rec.maps:
        raise ValueError("no attention probabilities were recorded; is this a timm VisionTransformer?")
    n = rec.maps[0].shape[-1]
    # The first pass over the image, while every layer sees all tokens (TransFG's last layer sees
    # only the selected part tokens, and tasks that re-run the backbone on crops record more).
    layers = list(itertools.takewhile(lambda a: a.shape[-1] == n, rec.maps[:len(rec.attns)]))
    eye = torch.eye(n, device=x.device)
    rollout = eye.expand(x.shape[0], n, n)
    for attn in layers:
        a = fuse[head_fusion](attn.float())
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls_to_patches = rollout[:, 0, prefix:]
    h, w = _patch_grid(model, tuple(x.shape[-2:]), cls_to_patches.shape[1])
    grid = cls_to_patches.reshape(-1, 1, h, w)
    return _upsample(grid, x), logits


def default_method(model: nn.Module) -> str:
    """"rollout" for ViT-style models with attention blocks, "gradcam" for everything else."""
    blocks = getattr(model, "blocks", None)
    is_vit = blocks is not None and any(hasattr(getattr(b, "attn", None), "attn_drop") for b in blocks) \
        and hasattr(model, "patch_embed")
    return "rollout" if is_vit else "gradcam"


def explain_batch(task: nn.Module, x: torch.Tensor, *, method: str = "gradcam",
                  target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps ``[B, H, W]`` and the task's logits for a batch with the registered ``method``."""
    from finegrain.tasks import require_classifier

    require_classifier(task, "an explanation")
    fn = METHODS.get(method)
    was_training = task.training
    task.eval()
    try:
        return fn(task, x, target)
    finally:
        task.train(was_training)


# ---------------------------------------------------------------- images in, maps and overlays out


def display_crop(img: Image.Image, preprocessing: dict) -> Image.Image:
    """The RGB pixels the model saw: the eval transform's resize + center crop, without normalising."""
    import math

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    size = preprocessing["img_size"]
    resize = int(math.floor(size / preprocessing["crop_pct"]))
    interp = InterpolationMode.BICUBIC if preprocessing.get("interpolation") == "bicubic" else InterpolationMode.BILINEAR
    return TF.center_crop(TF.resize(img.convert("RGB"), resize, interpolation=interp, antialias=True), size)


def explain(predictor, images: Sequence[str | Path | Image.Image], *, method: str | None = None,
            target: int | Sequence[int] | None = None) -> list[tuple[np.ndarray, int]]:
    """Explain a :class:`~finegrain.predict.Predictor`'s decisions on ``images``.

    Args:
        predictor: from ``Predictor.from_checkpoint(path)``.
        images: file paths or PIL images (folders are not expanded here).
        method: "gradcam", "gradcampp" or "rollout"; None picks from the backbone (rollout for
            ViTs, Grad-CAM otherwise).
        target: class to explain, one for all images or one per image; None uses the prediction.

    Returns:
        One ``(heatmap, predicted_class)`` per image: the heatmap is a float32 ``H x W`` array in
        ``[0, 1]`` over the eval crop (``img_size`` square) and the class is an index into
        ``predictor.classes``.

    Raises:
        ValueError: an unknown method or target, or a model the method cannot handle.

    Note:
        Scores are the task's own logits (what ``predict`` returns). Grad-CAM differentiates them
        with respect to the first feature map the task computes, the pass over the whole image;
        for tasks that also classify crops (WS-DAN, RA-CNN, the part models) the crops' own
        evidence reaches the map only through that first pass.
    """
    from finegrain.data.dataset import load_rgb

    model = predictor.task.model
    method = method or default_method(model)
    METHODS.get(method)  # fail early, naming the valid methods
    pil = [im.convert("RGB") if isinstance(im, Image.Image) else load_rgb(str(im)) for im in images]
    n_classes = len(predictor.classes)
    if target is None:
        targets = None
    else:
        targets = [int(target)] * len(pil) if isinstance(target, (int, np.integer)) else [int(t) for t in target]
        if len(targets) != len(pil):
            raise ValueError(f"{len(targets)} targets given for {len(pil)} images")
        bad = [t for t in targets if not 0 <= t < n_classes]
        if bad:
            raise ValueError(f"target class {bad[0]} out of range; the checkpoint has {n_classes} classes")
    out: list[tuple[np.ndarray, int]] = []
    bs = max(1, predictor.batch_size)
    for start in range(0, len(pil), bs):
        x = torch.stack([predictor.transform(im) for im in pil[start:start + bs]]).to(predictor.device)
        t = None if targets is None else torch.tensor(targets[start:start + bs], device=predictor.device)
        maps, logits = explain_batch(predictor.task, x, method=method, target=t)
        for m, c in zip(maps.cpu().numpy().astype(np.float32), logits.argmax(1).tolist()):
            out.append((m, int(c)))
    return out


def overlay(img: Image.Image, heatmap: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """Blend ``heatmap`` (``[0, 1]``, any size) as a matplotlib colormap onto ``img``."""
    from matplotlib import colormaps

    img = img.convert("RGB")
    hm = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
    colored = colormaps[cmap](np.asarray(hm, dtype=np.float32) / 255.0)[..., :3]
    return Image.blend(img, Image.fromarray((colored * 255).astype(np.uint8)), alpha)


def save_overlays(predictor, images: Sequence[str | Path], out_dir: str | Path, *, method: str | None = None,
                  target: int | None = None, alpha: float = 0.45) -> list[dict]:
    """Explain ``images`` and write ``<stem>_<method>.png`` overlays (crop | overlay side by side).

    Returns:
        One record per image: ``{"path", "overlay", "method", "predicted", "target"}`` or
        ``{"path", "error"}`` for an unreadable file.
    """
    from finegrain.data.dataset import load_rgb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = method or default_method(predictor.task.model)
    records: list[dict] = []
    used: set[str] = set()
    for path in images:
        try:
            img = load_rgb(str(path))
        except Exception as e:  # noqa: BLE001  (report, keep going)
            records.append({"path": str(path), "error": f"cannot read image: {type(e).__name__}: {e}"})
            continue
        (heat, cls), = explain(predictor, [img], method=method, target=target)
        crop = display_crop(img, predictor.meta["preprocessing"])
        blended = overlay(crop, heat, alpha=alpha)
        canvas = Image.new("RGB", (crop.width * 2, crop.height))
        canvas.paste(crop, (0, 0))
        canvas.paste(blended, (crop.width, 0))
        name = f"{Path(path).stem}_{method}"
        while name in used:  # same stem in two folders
            name += "_"
        used.add(name)
        dest = out / f"{name}.png"
        atomic_write(dest, lambda tmp, c=canvas: c.save(tmp, format="PNG"))
        records.append({"path": str(path), "overlay": str(dest), "method": method,
                        "predicted": predictor.classes[cls], "target": predictor.classes[target if target is not None else cls]})
    return records

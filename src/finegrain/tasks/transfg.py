"""TransFG: "TransFG: A Transformer Architecture for Fine-grained Recognition" (He et al., arXiv:2103.07976).

The part selection module: the attention maps of all layers but the last are multiplied
(attention rollout); for each head, the patch token the class token attends to most is kept,
and only the prefix (class) tokens and these selected tokens enter the last layer. A contrastive
loss on the class token (``1 - cos`` for pairs of one class, ``max(cos - margin, 0)`` otherwise)
is added to the cross-entropy. Works with timm ``VisionTransformer``-style models (a class
token, ``blocks`` of standard ``Attention``); other backbones are refused.

As in the paper and the authors' code (TACJu/TransFG, ``models/modeling.py``):

* Overlapping patches (the paper's Sec. 3.1, "overlap" split): the patch embedding slides by
  ``slide_step`` = 12 pixels for 16 px patches, and the position embedding is resampled
  (bilinearly, as the authors' ``ndimage.zoom(order=1)``) to the larger grid.
  ``slide_step=0`` keeps the backbone's non-overlapping patches.
* The part layer (the last block, which sees only the class token and the selected parts) and
  its norm start untrained: the authors' ``load_from`` skips ``part_layer`` and ``part_norm``, so
  the pretrained last block is replaced by a freshly initialised one (their ``Block`` init:
  torch defaults, the MLP Xavier-uniform with biases ~ N(0, 1e-6)); these parameters then get
  the full learning rate. ``part_layer="pretrained"`` keeps the pretrained block (the form
  finegrain used before).
* The contrastive loss is the pairs' sum divided by the batch size B (the authors' ``con_loss``,
  ``loss /= B``), i.e. B times the mean over the B^2 pairs; ``contrastive_norm="pairs"`` divides
  by B^2 instead (the paper's Eq. 9, and the form finegrain used before: 32x weaker at B = 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.registry import close_matches
from finegrain.tasks.base import TASKS, Task, TaskOptions, option
from finegrain.tasks.supervised import soft_cross_entropy

_VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")


def attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, heads, N, N]`` that ``block`` computes on tokens ``x`` (its input)."""
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def select_parts(attentions: list[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Token indices ``[B, heads]``: per head, the patch with the largest rolled-out attention from token 0."""
    rollout = attentions[0]
    for a in attentions[1:]:
        rollout = a @ rollout
    return rollout[:, :, 0, num_prefix:].argmax(-1) + num_prefix


CONTRASTIVE_NORMS = {"batch": 1, "pairs": 2}
"""What the contrastive loss's pair sum is divided by: B ("batch", the authors' code) or B^2 ("pairs")."""


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.4, norm: str = "batch") -> torch.Tensor:
    """TransFG's loss: over all pairs, ``1 - cos`` (same class) or ``relu(cos - margin)`` (different), summed.

    Args:
        norm: "batch" divides the sum by the batch size (the authors' ``con_loss``), "pairs" by
            its square (the mean over pairs).
    """
    z = F.normalize(features.float(), dim=-1)
    cos = z @ z.T
    same = labels[:, None] == labels[None, :]
    loss = torch.where(same, 1 - cos, F.relu(cos - margin))
    return loss.sum() / labels.shape[0] ** CONTRASTIVE_NORMS[norm]


def overlap_patches(model: nn.Module, step: int) -> None:
    """Make ``model``'s patch embedding slide by ``step`` pixels and resample its position embedding to the new grid.

    The grid of an ``S``-pixel side becomes ``(S - P) // step + 1`` patches for ``P``-pixel patches.
    """
    pe = model.patch_embed
    old = tuple(pe.grid_size)
    pe.proj.stride = (step, step)
    new = tuple((s - p) // step + 1 for s, p in zip(pe.img_size, pe.patch_size))
    pe.grid_size, pe.num_patches = new, new[0] * new[1]
    if getattr(model, "pos_embed", None) is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(model.pos_embed.detach(), list(new), list(old), num_prefix_tokens=prefix,
                                     interpolation="bilinear", antialias=False)
        model.pos_embed = nn.Parameter(pos)


def reset_part_layer(block: nn.Module, norm: nn.Module) -> None:
    """Re-initialise the part layer and its norm as the authors' fresh ``Block`` and ``LayerNorm``."""
    for m in [*block.modules(), *norm.modules()]:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    mlp = getattr(block, "mlp", None)
    for fc in (getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)):
        if isinstance(fc, nn.Linear):
            nn.init.xavier_uniform_(fc.weight)
            if fc.bias is not None:
                nn.init.normal_(fc.bias, std=1e-6)


@dataclass
class TransFGOptions(TaskOptions):
    contrastive_weight: float = option(1.0, "weight of the contrastive loss on the class token (0 turns it off)",
                                       flag="transfg-contrastive-weight")
    margin: float = option(0.4, "cosine margin of the contrastive loss for pairs of different classes", flag="transfg-margin")
    contrastive_norm: str = option("batch", "contrastive loss's pair sum divided by the batch size (batch, the authors' "
                                   "code) or its square (pairs)", flag="transfg-contrastive-norm")
    slide_step: int = option(12, "patch embedding stride in pixels (12 for 16 px patches: overlapping, the paper's "
                             "recipe); 0 keeps the backbone's non-overlapping patches", flag="transfg-slide-step")
    part_layer: str = option("new", "the last (part) layer starts untrained (new, as the authors) or from the "
                             "pretrained last block (pretrained)", flag="transfg-part-layer")

    def check(self) -> None:
        _check_transfg(self.contrastive_weight, self.contrastive_norm, self.slide_step, self.part_layer)


def _check_transfg(weight: float, norm: str, step: int, part_layer: str) -> None:
    if weight < 0:
        raise ValueError(f"--transfg-contrastive-weight must be >= 0, got {weight}")
    for flag, value, valid in (("--transfg-contrastive-norm", norm, list(CONTRASTIVE_NORMS)),
                               ("--transfg-part-layer", part_layer, ["new", "pretrained"])):
        if value not in valid:
            hint = close_matches(value, valid)
            raise ValueError(f"{flag} must be one of {', '.join(valid)}, got {value!r}"
                             + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if step < 0:
        raise ValueError(f"--transfg-slide-step must be >= 0 (0: non-overlapping patches), got {step}")


@TASKS.register("transfg")
class TransFGTask(Task):
    """A ViT whose last layer sees only the class token(s) and one selected part token per head.

    Args:
        contrastive_weight: weight of the contrastive loss (0 turns it off).
        margin: the contrastive loss's margin for pairs of different classes.
        contrastive_norm: "batch" (the authors' code) or "pairs" (see the module docstring).
        slide_step: patch stride in pixels, at most the patch side (0: the backbone's own).
        part_layer: "new" (the authors': the last block and norm re-initialised) or "pretrained".
    """

    name = "transfg"
    Options = TransFGOptions
    cam_layer = "part_input"

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0,
                 contrastive_weight: float = 1.0, margin: float = 0.4, contrastive_norm: str = "batch",
                 slide_step: int = 12, part_layer: str = "new"):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        _check_transfg(contrastive_weight, contrastive_norm, slide_step, part_layer)
        blocks = getattr(model, "blocks", None)
        ok = all(hasattr(model, p) for p in _VIT_PARTS) and blocks is not None and len(blocks) >= 2 and all(
            hasattr(getattr(b, "attn", None), "qkv") and hasattr(b, "norm1") for b in blocks)
        if not ok or getattr(model, "num_prefix_tokens", 0) < 1 or not getattr(model, "has_class_token", True):
            raise ValueError(f"transfg needs a timm VisionTransformer with a class token and at least 2 blocks "
                             f"(e.g. vit_base_patch16_224, deit_small_patch16_224, test_vit), got {type(model).__name__}; "
                             "for CNN backbones use --task fgvc or --task wsdan")
        self._setup_recipe(model, slide_step, part_layer)
        self.contrastive_weight, self.margin, self.contrastive_norm = contrastive_weight, margin, contrastive_norm
        self.part_layer = part_layer
        self.part_input = nn.Identity()  # all tokens before part selection: where Grad-CAM reads the map
        self.args = {"contrastive_weight": contrastive_weight, "margin": margin, "contrastive_norm": contrastive_norm,
                     "slide_step": slide_step, "part_layer": part_layer, "label_smoothing": label_smoothing}

    @staticmethod
    def _setup_recipe(model: nn.Module, slide_step: int, part_layer: str) -> None:
        patch = min(model.patch_embed.patch_size)
        if slide_step > patch:
            raise ValueError(f"--transfg-slide-step {slide_step} is larger than the {patch} px patches (pixels would be "
                             f"skipped): use at most {patch}, or 0 for the backbone's own patches")
        if slide_step and slide_step != patch:
            overlap_patches(model, slide_step)
        if part_layer == "new":
            reset_part_layer(model.blocks[-1], model.norm)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed tokens after the last layer [B, prefix + heads, C], selected indices [B, heads])``."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        maps = []
        for blk in m.blocks[:-1]:
            with torch.no_grad():
                maps.append(attention_probs(blk, x).float())
            x = blk(x)
        x = self.part_input(x)
        idx = select_parts(maps, m.num_prefix_tokens)
        parts = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, : m.num_prefix_tokens], parts], dim=1)
        return m.norm(m.blocks[-1](x)), idx

    def forward(self, batch):
        tokens, _ = self.tokens(batch["image"])
        feats = self.model.forward_head(tokens, pre_logits=True)
        logits = self.model.get_classifier()(feats)
        target = batch.get("target", batch["label"])
        ce = soft_cross_entropy(logits, target, self.label_smoothing)
        out = {"logits": logits, "ce": ce.detach()}
        loss = ce
        if self.contrastive_weight > 0:
            con = contrastive_loss(feats, batch["label"], self.margin, self.contrastive_norm)
            loss = loss + self.contrastive_weight * con
            out["contrastive"] = con.detach()
        out["loss"] = loss
        return out

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.tokens(images)[0])

    def task_args(self):
        return dict(self.args)

    def new_parameter_names(self) -> set[str]:
        names = super().new_parameter_names()
        if self.part_layer == "new":  # untrained part layer and norm: the full learning rate
            prefixes = (f"model.blocks.{len(self.model.blocks) - 1}.", "model.norm.")
            names |= {n for n, _ in self.named_parameters() if n.startswith(prefixes)}
        return names

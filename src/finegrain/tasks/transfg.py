"""TransFG: "TransFG: A Transformer Architecture for Fine-grained Recognition" (He et al., arXiv:2103.07976).

The part selection module: the attention maps of all layers but the last are multiplied
(attention rollout); for each head, the patch token the class token attends to most is kept,
and only the prefix (class) tokens and these selected tokens enter the last layer. A contrastive
loss on the class token (``1 - cos`` for pairs of one class, ``max(cos - margin, 0)`` otherwise)
is added to the cross-entropy. Works with timm ``VisionTransformer``-style models (a class
token, ``blocks`` of standard ``Attention``); other backbones are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.4) -> torch.Tensor:
    """TransFG's loss: mean over all pairs of ``1 - cos`` (same class) or ``relu(cos - margin)`` (different)."""
    z = F.normalize(features.float(), dim=-1)
    cos = z @ z.T
    same = labels[:, None] == labels[None, :]
    loss = torch.where(same, 1 - cos, F.relu(cos - margin))
    return loss.sum() / labels.shape[0] ** 2


@dataclass
class TransFGOptions(TaskOptions):
    contrastive_weight: float = option(1.0, "weight of the contrastive loss on the class token (0 turns it off)",
                                       flag="transfg-contrastive-weight")
    margin: float = option(0.4, "cosine margin of the contrastive loss for pairs of different classes", flag="transfg-margin")

    def check(self) -> None:
        if self.contrastive_weight < 0:
            raise ValueError(f"--transfg-contrastive-weight must be >= 0, got {self.contrastive_weight}")


@TASKS.register("transfg")
class TransFGTask(Task):
    """A ViT whose last layer sees only the class token(s) and one selected part token per head.

    Args:
        contrastive_weight: weight of the contrastive loss (0 turns it off).
        margin: the contrastive loss's margin for pairs of different classes.
    """

    name = "transfg"
    Options = TransFGOptions
    cam_layer = "part_input"

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0,
                 contrastive_weight: float = 1.0, margin: float = 0.4):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        blocks = getattr(model, "blocks", None)
        ok = all(hasattr(model, p) for p in _VIT_PARTS) and blocks is not None and len(blocks) >= 2 and all(
            hasattr(getattr(b, "attn", None), "qkv") and hasattr(b, "norm1") for b in blocks)
        if not ok or getattr(model, "num_prefix_tokens", 0) < 1 or not getattr(model, "has_class_token", True):
            raise ValueError(f"transfg needs a timm VisionTransformer with a class token and at least 2 blocks "
                             f"(e.g. vit_base_patch16_224, deit_small_patch16_224, test_vit), got {type(model).__name__}; "
                             "for CNN backbones use --task fgvc or --task wsdan")
        self.contrastive_weight, self.margin = contrastive_weight, margin
        self.part_input = nn.Identity()  # all tokens before part selection: where Grad-CAM reads the map
        self.args = {"contrastive_weight": contrastive_weight, "margin": margin, "label_smoothing": label_smoothing}

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
            con = contrastive_loss(feats, batch["label"], self.margin)
            loss = loss + self.contrastive_weight * con
            out["contrastive"] = con.detach()
        out["loss"] = loss
        return out

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.tokens(images)[0])

    def task_args(self):
        return dict(self.args)

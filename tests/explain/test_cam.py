"""Grad-CAM, Grad-CAM++, attention rollout, explain through a Predictor and overlays from the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finegrain.explain.cam import METHODS, attention_rollout, default_method, explain, grad_cam, grad_cam_pp

from ..helpers import make_explain_checkpoint as make_checkpoint


class TwoColourCNN(nn.Module):
    """Channel 0 detects red, channel 1 blue; class k's score is the spatial mean of channel k.

    The evidence for each class therefore sits exactly where its colour is in the input.
    """

    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 4, stride=4, bias=False)  # 4x4 patches -> a coarse map, as in a real CNN
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 16
            self.conv.weight[0, 2] = -1.0 / 16
            self.conv.weight[1, 2] = 1.0 / 16
            self.conv.weight[1, 0] = -1.0 / 16

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, feats, pre_logits: bool = False):
        return feats.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def as_task(model: nn.Module) -> nn.Module:
    """A plain supervised task around ``model`` (the explainers take tasks)."""
    from finegrain.tasks import build_task

    return build_task("supervised", model, 2).eval()


def _two_blob_image(size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    h = size // 2
    x[0, 0, 4:h - 4, 4:h - 4] = 1.0  # red, top-left quadrant
    x[0, 2, h + 4:size - 4, h + 4:size - 4] = 1.0  # blue, bottom-right quadrant
    return x


def _peak_quadrant(m: torch.Tensor) -> tuple[int, int]:
    r, c = divmod(int(m.flatten().argmax()), m.shape[1])
    return r // (m.shape[0] // 2), c // (m.shape[1] // 2)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_peak_falls_on_the_class_evidence(method):
    task = as_task(TwoColourCNN())
    x = _two_blob_image()
    fn = METHODS.get(method)
    maps0, logits = fn(task, x, torch.tensor([0]))
    maps1, _ = fn(task, x, torch.tensor([1]))
    assert maps0.shape == (1, 32, 32)
    assert _peak_quadrant(maps0[0]) == (0, 0)  # red evidence: top-left
    assert _peak_quadrant(maps1[0]) == (1, 1)  # blue evidence: bottom-right
    # the other class's region gets nothing
    assert maps0[0, 20:, 20:].max() < 0.05 and maps1[0, :12, :12].max() < 0.05


@pytest.mark.parametrize("fn", [grad_cam, grad_cam_pp])
def test_cam_maps_are_normalised_and_non_negative(fn):
    torch.manual_seed(0)
    from finegrain.models.backbone import create_backbone

    model = create_backbone("test_resnet", num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    maps, logits = fn(as_task(model), x)
    assert maps.shape == (3, 64, 64) and logits.shape == (3, 4)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for m in maps:
        assert m.max() == pytest.approx(1.0) or m.max() == 0  # 0 only when the map is flat
    torch.testing.assert_close(logits, model(x))  # the head sees the same features as a plain forward
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left behind


class PooledLinear(nn.Module):
    """The features are the input itself (3 channels); the head averages them and applies ``Linear(3, 2)``."""

    num_prefix_tokens = 0

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight))
            self.fc.bias.zero_()

    def forward_features(self, x):
        return x

    def forward_head(self, feats, pre_logits: bool = False):
        return self.fc(feats.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_gradcampp_weights_match_a_hand_computation_with_several_active_channels():
    """Class score ``S = sum_k w_k mean(A_k)``: every gradient is ``g_k = w_k / Z`` (``Z = h w``), so the
    paper's eq. 19 gives ``alpha_k = 1 / (2 + g_k sum(A_k))`` and channel weight ``Z alpha_k relu(g_k)``.
    With channels of different total activation, Grad-CAM++ and Grad-CAM weight them differently."""
    w = [[0.5, 1.0, 2.0], [1.0, -1.0, 0.0]]
    a = torch.tensor([[[1.0, 3.0], [0.0, 2.0]], [[4.0, 0.5], [1.0, 1.5]], [[0.2, 0.1], [0.6, 0.3]]])
    x = a[None]
    task = as_task(PooledLinear(w))
    z = 4.0
    weights = []
    for k in range(3):
        g = w[0][k] / z
        total = float(a[k].sum())
        weights.append(z * max(g, 0.0) / (2 + g * total))
    cam = torch.relu(sum(wk * a[k] for k, wk in enumerate(weights)))
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    pp, logits = grad_cam_pp(task, x, torch.tensor([0]))  # the 2x2 map is "upsampled" to its own size
    torch.testing.assert_close(pp[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, task.predict(x))
    plain, _ = grad_cam(task, x, torch.tensor([0]))
    cam_plain = torch.relu(sum(w[0][k] / z * a[k] for k in range(3)))
    torch.testing.assert_close(plain[0], (cam_plain - cam_plain.min()) / (cam_plain.max() - cam_plain.min()), atol=1e-5, rtol=1e-5)
    assert (pp[0] - plain[0]).abs().max() > 0.05  # the two formulas really differ here


def _vit_attention_by_hand(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax attention ``[B, heads, N, N]``, computed from its qkv projection."""
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    maps = []
    for blk in model.blocks:
        attn = blk.attn
        b, n, c = tokens.shape
        qkv = attn.qkv(blk.norm1(tokens)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / (c // attn.num_heads) ** 0.5, dim=-1))
        tokens = blk(tokens)
    return maps


def test_rollout_matches_a_naive_rollout_of_attention_computed_by_hand():
    from finegrain.models.backbone import create_backbone

    torch.manual_seed(1)
    model = create_backbone("test_vit", num_classes=3).eval()
    x = torch.randn(2, 3, 48, 48)  # 3x3 patches + 1 class token
    with torch.no_grad():
        layers = _vit_attention_by_hand(model, x)
    n = layers[0].shape[-1]
    r = torch.eye(n).expand(2, n, n)
    for a in layers:
        a = 0.5 * a.mean(1) + 0.5 * torch.eye(n)
        r = (a / a.sum(-1, keepdim=True)) @ r
    grid = r[:, 0, 1:].reshape(2, 1, 3, 3)
    up = torch.nn.functional.interpolate(grid, size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).min(1).values[:, None, None], up.flatten(1).max(1).values[:, None, None]
    maps, logits = attention_rollout(as_task(model), x)
    torch.testing.assert_close(maps, (up - lo) / (hi - lo), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-4)


def test_rollout_on_test_vit(tmp_path):
    from finegrain.models.backbone import create_backbone

    torch.manual_seed(0)
    model = create_backbone("test_vit", num_classes=3).eval()
    assert default_method(model) == "rollout"
    fused = [b.attn.fused_attn for b in model.blocks]
    x = torch.randn(2, 3, 64, 64)
    maps, logits = attention_rollout(as_task(model), x)
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-4)  # unfused attention gives the same logits
    assert [b.attn.fused_attn for b in model.blocks] == fused  # restored after recording


def test_rollout_refuses_a_cnn():
    from finegrain.models.backbone import create_backbone

    model = create_backbone("test_resnet", num_classes=3).eval()
    assert default_method(model) == "gradcam"
    with pytest.raises(ValueError, match="ViT"):
        attention_rollout(as_task(model), torch.randn(1, 3, 32, 32))


def test_explain_through_predictor_and_target(tmp_path):
    from finegrain.predict import Predictor

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "test_resnet", img_size=64)
    p = Predictor.from_checkpoint(ckpt, device="cpu")
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (80, 90, 3), dtype=np.uint8)) for i in range(3)]
    out = explain(p, imgs)
    assert len(out) == 3
    for heat, cls in out:
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
        assert 0 <= cls < 3
    preds = [r["topk"][0]["index"] for r in p.predict(imgs, topk=1)]
    assert [c for _, c in out] == preds
    out_pp = explain(p, imgs, method="gradcampp", target=[0, 1, 2])
    assert len(out_pp) == 3
    with pytest.raises(ValueError, match="out of range"):
        explain(p, imgs[:1], target=7)
    with pytest.raises(ValueError, match="gradcam"):
        explain(p, imgs[:1], method="lime")


def test_cli_explain_writes_overlays(tmp_path, image_folder):
    import json

    from finegrain.cli import main

    ckpt = make_checkpoint(tmp_path / "vit.safetensors", "test_vit", img_size=64)
    out = tmp_path / "explain"
    rc = main(["explain", str(ckpt), str(image_folder / "test" / "red"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    records = json.loads((out / "explain.json").read_text())
    assert len(records) == 3 and all(r["method"] == "rollout" for r in records)
    for r in records:
        img = Image.open(r["overlay"])
        assert img.size == (128, 64) and img.mode == "RGB"
    rc = main(["explain", str(ckpt), str(image_folder / "test" / "red"), "--out", str(out), "--method", "gradcam",
               "--target", "blue", "--device", "cpu"])
    assert rc == 0 and len(list(out.glob("*_gradcam.png"))) == 3
    assert main(["explain", str(ckpt), str(image_folder), "--out", str(out), "--target", "nope"]) == 2

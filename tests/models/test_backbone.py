"""Backbones: name suggestions and local pretrained weights."""

import pytest
import torch

from finegrain.models.backbone import create_backbone, load_pretrained_file


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(ValueError, match="resnet50"):
        create_backbone("resnet5O", num_classes=3)


def test_local_pretrained_drops_old_classifier(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("test_resnet", num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    sd, ref = model.state_dict(), src.state_dict()
    first = next(iter(ref))
    assert torch.equal(sd[first], ref[first])
    assert model.get_classifier().out_features == 3
    assert model.get_classifier().weight.abs().max() < 0.01  # a fresh near-zero head


def test_local_pretrained_wrong_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(create_backbone("test_efficientnet", num_classes=3).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit backbone"):
        load_pretrained_file(create_backbone("test_resnet", num_classes=3), tmp_path / "w.safetensors")


def test_pth_with_wrapped_state_dict(tmp_path):
    src = create_backbone("test_resnet", num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    model = create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.pth"))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())

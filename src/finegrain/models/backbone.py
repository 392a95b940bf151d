"""Backbones from timm, with pretrained weights from timm's hub or a local file.

Models keep timm's contract (``forward_features``, ``forward_head``, ``reset_classifier``,
``num_features``, ``pretrained_cfg``), so every method can wrap any backbone.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from finegrain.registry import close_matches

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_backbone(name: str) -> None:
    """Raise ``ValueError`` with close matches if timm has no model called ``name``."""
    if timm.is_model(name):
        return
    hint = close_matches(name, timm.list_models(), n=5)
    msg = f"unknown backbone {name!r}: timm has no such model."
    if hint:
        msg += f" Close matches: {', '.join(hint)}."
    raise ValueError(msg + " List them with `finegrain list-backbones PATTERN`.")


def torch_load_safely(path: str | Path, what: str, advice: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, with every failure as a ``ValueError`` naming ``what``.

    Only tensors, numbers, strings and containers are unpickled: a pickle that names any other
    global (code that would run on load) is refused before it runs. ``advice`` ends the message
    for a file that is not plain tensors.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"{path} ({what}) holds objects other than tensors and numbers ({found.group(1)}), so it "
                             f"was not loaded and nothing in it ran. {advice}") from None
        raise ValueError(f"{path} ({what}) is truncated or corrupt, or not a torch file") from None
    except Exception as e:  # noqa: BLE001  (zip, EOF and format errors alike)
        raise ValueError(f"{path} ({what}) is truncated or corrupt, or not a torch file: {e}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file (.safetensors, or a torch pickle holding a state dict, read tensors-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist (pass 'hub', 'none' or a file path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"pretrained weights file {path} is not a readable safetensors file "
                             f"(truncated or corrupt?): {e}") from None
    elif path.suffix in WEIGHT_SUFFIXES:
        sd = torch_load_safely(path, "pretrained weights", "Convert it to a plain state dict "
                               "(torch.save(model.state_dict(), ...)) or to .safetensors from a copy you trust.")
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    else:
        raise ValueError(f"unsupported weights file {path}: use one of {', '.join(WEIGHT_SUFFIXES)}")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained_file(model: nn.Module, path: str | Path) -> list[str]:
    """Load backbone weights from ``path`` into ``model``; return the classifier keys left untouched.

    The file's classifier is dropped when its shape differs from the model's (a new class count).
    Any other missing or unexpected key is an error that lists a few of them: the file was made
    for another architecture.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    head_name = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    head_prefixes = tuple(f"{h}." for h in ([head_name] if isinstance(head_name, str) else head_name) if h)
    dropped = [k for k in sd if k.startswith(head_prefixes) and (k not in own or own[k].shape != sd[k].shape)]
    for k in dropped:
        del sd[k]
    mismatched = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    result = model.load_state_dict({k: v for k, v in sd.items() if k not in mismatched}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    if missing or result.unexpected_keys or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})")
        raise ValueError(
            f"weights in {path} do not fit backbone {type(model).__name__}: {'; '.join(parts)}. "
            "Check that --backbone names the architecture the file was saved from."
        )
    return [k for k in result.missing_keys if k.startswith(head_prefixes)]


def create_backbone(
    name: str,
    *,
    num_classes: int,
    pretrained: str = "none",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build timm model ``name`` with a fresh ``num_classes`` classifier.

    Args:
        pretrained: "hub" downloads timm's default weights, "none" starts from random
            initialisation, anything else is a local weights file.
    """
    check_backbone(name)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained == "hub":
        model = timm.create_model(name, pretrained=True, **kwargs)
        if model.pretrained_cfg.get("num_classes") != num_classes:
            init_classifier(model)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained not in ("none", "", None) and load_pretrained_file(model, pretrained):
            init_classifier(model)  # the file's classifier did not fit: a new head
    return model


def init_classifier(model: nn.Module, std: float = 1e-3) -> None:
    """Start a new classifier near zero on top of pretrained features.

    Some timm inits (EfficientNet's ``1/sqrt(fan_out)`` uniform) give a few-class head logits of
    size ~10 on pretrained features, and the first epochs are spent undoing that.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for m in head.modules() if isinstance(head, nn.Module) else []:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias) if m.bias is not None else None


def data_config(model: nn.Module) -> dict:
    """Mean, std, crop_pct and interpolation from the model's pretrained config."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {
        "mean": tuple(float(x) for x in cfg["mean"]),
        "std": tuple(float(x) for x in cfg["std"]),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "interpolation": cfg.get("interpolation", "bilinear"),
    }

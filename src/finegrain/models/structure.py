"""The layer sizes of a pruned model: recorded in its checkpoint, re-applied to a freshly built one."""

from __future__ import annotations

import torch
from torch import nn

STRUCT_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                "normalized_shape", "num_channels", "head_hidden_size")
"""Module attributes that pruning changes and a checkpoint's ``structure`` records."""


def apply_structure(module: nn.Module, structure: dict[str, dict], state_dict: dict[str, torch.Tensor]) -> None:
    """Re-shape ``module`` in place so that ``state_dict`` (a pruned model's weights) loads into it."""
    for name, tensor in state_dict.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, leaf, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            if isinstance(current, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
            else:
                owner._buffers[leaf] = torch.empty_like(tensor)
    for name, attrs in structure.items():
        owner = module.get_submodule(name) if name else module
        for attr, value in attrs.items():
            setattr(owner, attr, tuple(value) if isinstance(value, list) else value)

"""Structured channel pruning with a target ratio, then fine-tuning through the shared loop.

Channels are ranked by group L2 magnitude and removed together with everything that depends on
them (the dependency graph of Fang et al., "DepGraph: Towards Any Structural Pruning",
arXiv:2301.12900, via the ``torch-pruning`` package). The pruned network no longer matches its
timm architecture, so the checkpoint records the changed layer sizes (``meta["structure"]``) and
:func:`apply_structure` re-shapes a freshly built model before its weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

STRUCT_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                "normalized_shape", "num_channels", "head_hidden_size")


def _structure_diff(pruned: nn.Module, reference: nn.Module) -> dict[str, dict]:
    ref = dict(reference.named_modules())
    diff: dict[str, dict] = {}
    for name, mod in pruned.named_modules():
        other = ref.get(name)
        for attr in STRUCT_ATTRS:
            if other is not None and hasattr(mod, attr) and getattr(mod, attr) != getattr(other, attr, None):
                value = getattr(mod, attr)
                diff.setdefault(name, {})[attr] = list(value) if isinstance(value, tuple) else value
    return diff


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


def prune_task(task, ratio: float, *, img_size: int) -> dict[str, dict]:
    """Prune ``task.model``'s channels by ``ratio`` in place (classifier outputs kept); return the structure diff."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ImportError("pruning needs torch-pruning: pip install 'finegrain[compress]'") from e
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    import copy

    model = task.model
    reference = copy.deepcopy(model)
    example = torch.randn(1, 3, img_size, img_size, device=next(model.parameters()).device)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.get_classifier()])
    pruner.step()
    diff = _structure_diff(model, reference)
    return {f"model.{k}" if k else "model": v for k, v in diff.items()}


def prune_checkpoint(checkpoint: str | Path, out: str | Path, *, ratio: float, data: str | None = None,
                     epochs: int = 0, lr: float = 1e-4, batch_size: int = 32, workers: int = 1,
                     device: str = "auto") -> dict:
    """Prune a checkpoint's backbone by ``ratio``, optionally fine-tune on ``data`` (train split), save to ``out``.

    Fine-tuning uses the shared ``train_one_epoch`` with AdamW and a cosine schedule. Returns a
    summary with parameter counts before and after.
    """
    from torch.utils.data import DataLoader

    from finegrain.data.datasets import open_dataset
    from finegrain.data.loader import ImageDataset, collate
    from finegrain.data.transforms import train_transform
    from finegrain.predict import task_from_checkpoint
    from finegrain.train.checkpoint import load_checkpoint, save_checkpoint
    from finegrain.train.loop import train_one_epoch
    from finegrain.utils import console, resolve_device

    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError("--out must differ from the input checkpoint; the original is never overwritten")
    dev = resolve_device(device)
    task, meta = task_from_checkpoint(checkpoint, dev)
    before = sum(p.numel() for p in task.parameters())
    prep = meta["preprocessing"]
    structure = prune_task(task, ratio, img_size=prep["img_size"])
    after = sum(p.numel() for p in task.parameters())
    history = []
    if epochs > 0:
        if not data:
            raise ValueError("fine-tuning after pruning needs --data (the training images); or pass --epochs 0")
        images = open_dataset(data, "train")
        if images.classes != meta["classes"]:
            raise ValueError(f"the classes of {data} differ from the checkpoint's")
        t = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
        loader = DataLoader(ImageDataset(images, t), batch_size=batch_size, shuffle=True, num_workers=workers,
                            collate_fn=collate, drop_last=len(images) > batch_size)
        opt = torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
        for epoch in range(epochs):
            r = train_one_epoch(task, loader, opt, sched, device=dev)
            r.pop("skipped")
            history.append(r)
            console.print(f"fine-tune epoch {epoch + 1}/{epochs}: loss {r['loss']:.3f} acc {r['acc']:.1f}%")
    prev = meta.get("structure", {})
    summary = {"ratio": ratio, "params_before": before, "params_after": after, "fine_tune_epochs": epochs}
    new_meta = {k: v for k, v in meta.items() if k not in ("format_version", "versions")}
    new_meta.update({"structure": {**prev, **structure}, "pruning": summary, "metrics": {}, "source_checkpoint": str(checkpoint)})
    save_checkpoint(out, task.state_dict(), new_meta)
    load_checkpoint(out)  # read back: the file must be usable as written
    return {**summary, "out": str(out), "history": history}

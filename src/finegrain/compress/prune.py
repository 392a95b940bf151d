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

from finegrain.models.structure import STRUCT_ATTRS
from finegrain.tasks import require_plain_classifier


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
                     device: str = "auto", seed: int = 0, resume: bool = False, max_epochs: int | None = None) -> dict:
    """Prune a checkpoint's backbone by ``ratio``, optionally fine-tune on ``data`` (train split), save to ``out``.

    Fine-tuning (AdamW, cosine schedule) runs through the one trainer in the run folder
    ``<out stem>.finetune/`` next to ``out``: Ctrl-C keeps it resumable (same command with
    ``resume=True``). Returns a summary with parameter counts before and after.
    """
    from finegrain import checkpoint as ckpt
    from finegrain.data.base import open_dataset
    from finegrain.train.finetune import finetune
    from finegrain.train.trainer import open_job
    from finegrain.utils import resolve_device

    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError("--out must differ from the input checkpoint; the original is never overwritten")
    if epochs > 0 and not data:
        raise ValueError("fine-tuning after pruning needs --data (the training images); or pass --epochs 0")
    dev = resolve_device(device)
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    task, meta = ckpt.load_task(checkpoint, dev)
    require_plain_classifier(task, "pruning", "it removes channels of the backbone's last features")
    before = sum(p.numel() for p in task.parameters())
    structure = prune_task(task, ratio, img_size=meta.preprocessing["img_size"])
    summary = {"ratio": ratio, "params_before": before, "params_after": sum(p.numel() for p in task.parameters()),
               "fine_tune_epochs": epochs}
    pruned = ckpt.derive(meta, "pruned", checkpoint, details={"ratio": ratio, "fine_tune_epochs": epochs},
                         structure={**(meta.structure or {}), **structure}, pruning=summary)
    history = []
    if epochs > 0:
        images = open_dataset(data, "train")
        if images.classes != meta.classes:
            raise ValueError(f"the classes of {data} differ from the checkpoint's")
        run_dir = out.with_name(out.name.removesuffix(".safetensors") + ".finetune")
        job = {"checkpoint": str(checkpoint), "ratio": ratio, "data": str(data), "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "seed": seed}
        resumed = open_job(run_dir, job, resume=resume)
        r = finetune(task, images, meta.preprocessing, run_dir, pruned, epochs=epochs, lr=lr, weight_decay=0.01,
                     batch_size=batch_size, workers=workers, device=dev, seed=seed, resume=resumed, max_epochs=max_epochs)
        history = r.history
        if r.interrupted or r.epochs_run < epochs:
            return {**summary, "out": None, "run_dir": str(run_dir), "interrupted": True, "history": history}
    ckpt.save(out, task.state_dict(), pruned)
    ckpt.load(out)  # read back: the file must be usable as written
    return {**summary, "out": str(out), "history": history}

"""Self-describing checkpoints: safetensors weights with JSON metadata, written atomically.

A checkpoint file (``best.safetensors``, ``last.safetensors``) holds the task's weights and, in
the safetensors header, everything needed to use it: backbone and task, class names,
preprocessing, metrics and package versions. Eval, predict and export need only its path.
The optimizer, scheduler and RNG states needed to resume sit beside it in ``last.state.pt``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
META_KEY = "finegrain"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from finegrain import __version__

    return {"finegrain": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state_dict`` and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    full = {"format_version": FORMAT_VERSION, "versions": versions(), **meta}
    header = {META_KEY: json.dumps(full)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))
    return Path(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (its ``best.safetensors``, else ``last``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no best.safetensors or last.safetensors in run folder {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's metadata without loading its weights."""
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    if META_KEY not in header:
        raise ValueError(f"{path} is a safetensors file without finegrain metadata; train with finegrain or load it as --pretrained")
    meta = json.loads(header[META_KEY])
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {version!r}; this finegrain reads format <= {FORMAT_VERSION}. "
            f"It was written by finegrain {meta.get('versions', {}).get('finegrain', '?')}: upgrade finegrain."
        )
    return meta


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, metadata)`` of a checkpoint file or run folder."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    try:
        sd = load_file(str(path), device=map_location)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: could not read the weights (truncated or corrupt?): {e}") from e
    return sd, meta


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no resume state at {path}; resume needs a run folder with last.state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is truncated or corrupt and cannot be resumed: {e}") from e

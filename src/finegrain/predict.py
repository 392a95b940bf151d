"""``Predictor``: the one inference API behind ``finegrain predict``, eval, export and serving."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image

from finegrain.checkpoint import load_task
from finegrain.data.base import IMAGE_EXTENSIONS
from finegrain.data.dataset import load_rgb
from finegrain.data.transforms import eval_transform
from finegrain.tasks import Task, require_classifier
from finegrain.utils import resolve_device


def expand_images(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (recursively, sorted)."""
    out: list[Path] = []
    for item in items:
        if "://" in str(item):
            raise ValueError(f"{item} is a URL; finegrain reads local files and folders. Download it first "
                             f"(curl -O '{item}') and pass the file")
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)
    return out


class Predictor:
    """Top-k predictions from a checkpoint.

    Example:
        >>> p = Predictor.from_checkpoint("runs/my-run/best.safetensors")
        >>> p.predict(["bird.jpg"], topk=3)[0]["topk"][0]
        {'class': 'Cardinal', 'index': 17, 'score': 0.93}
    """

    def __init__(self, task: Task, meta: dict, *, device: torch.device, batch_size: int = 32, tta_flip: bool = False):
        require_classifier(task, "this command")
        self.task, self.meta, self.device = task, meta, device
        self.classes: list[str] = list(meta["classes"])
        p = meta["preprocessing"]
        self.transform = eval_transform(p["img_size"], mean=p["mean"], std=p["std"], crop_pct=p["crop_pct"],
                                        interpolation=p["interpolation"])
        self.batch_size = batch_size
        self.tta_flip = tta_flip

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", batch_size: int = 32, tta_flip: bool = False) -> Predictor:
        dev = resolve_device(device)
        task, meta = load_task(path, dev)
        return cls(task, meta, device=dev, batch_size=batch_size, tta_flip=tta_flip)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of already-transformed images ``[B, 3, H, W]``."""
        images = images.to(self.device)
        out = self.task.predict(images).float()
        if self.tta_flip:
            out = (out + self.task.predict(torch.flip(images, dims=[3])).float()) / 2
        return out

    def predict(self, images: Sequence[str | Path | Image.Image], topk: int = 5) -> list[dict]:
        """Predict each image; unreadable files get ``{"path", "error"}`` and the rest go on.

        Args:
            images: file paths, folders (expanded) or PIL images.
            topk: how many classes to return per image.

        Returns:
            One dict per image: ``{"path", "topk": [{"class", "index", "score"}, ...]}`` with
            softmax scores, or ``{"path", "error"}``.
        """
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        k = min(topk, len(self.classes))
        items: list = []
        for im in images:
            items += expand_images([im]) if isinstance(im, (str, Path)) else [im]
        results: list[dict | None] = [None] * len(items)
        ready: list[tuple[int, torch.Tensor]] = []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, Path)) else f"<image {i}>"
            try:
                img = item.convert("RGB") if isinstance(item, Image.Image) else load_rgb(str(item))
                ready.append((i, self.transform(img)))
            except Exception as e:  # noqa: BLE001  (report, keep going)
                results[i] = {"path": name, "error": f"cannot read image: {type(e).__name__}: {e}"}
            if len(ready) == self.batch_size:
                self._run(ready, items, results, k)
                ready = []
        if ready:
            self._run(ready, items, results, k)
        return [r for r in results if r is not None]

    def _run(self, ready, items, results, k) -> None:
        probs = self.logits(torch.stack([t for _, t in ready])).softmax(1).cpu()
        scores, idx = probs.topk(k, dim=1)
        for (i, _), s, c in zip(ready, scores.tolist(), idx.tolist()):
            item = items[i]
            results[i] = {
                "path": str(item) if isinstance(item, (str, Path)) else f"<image {i}>",
                "topk": [{"class": self.classes[j], "index": j, "score": round(v, 6)} for v, j in zip(s, c)],
            }

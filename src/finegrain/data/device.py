"""The device pipeline: decode and augment whole batches where the model runs (GPU or CPU).

In the default CPU pipeline every loader worker decodes a JPEG with Pillow and crops, flips and
normalises it alone. At 448 px one CPU core manages about 200 images/s that way, far below what a
GPU trains. Here the workers only read bytes (or slice the decoded cache) and the batch is
finished on the device:

- :func:`decode_jpegs` decodes a list of JPEG files at once with nvJPEG
  (``torchvision.io.decode_jpeg(..., device="cuda")``); any file it cannot decode (CMYK,
  unusual progressive files, PNG, ...) falls back to the CPU decoder, one file at a time.
- :class:`DeviceAugment` draws a random-resized-crop box per image with the same algorithm and
  distribution as torchvision's ``RandomResizedCrop`` (:func:`sample_crop_boxes`), crops and resizes
  the whole batch in one ``roi_align`` call (bilinear sampling, averaged over ``ceil(box / output)``
  points per output pixel, so downscaling is anti-aliased), flips, jitters brightness, contrast
  and saturation per image, and normalises.
- :class:`DevicePrefetcher` prepares the next batch on a side CUDA stream while the current one
  trains (on the CPU it prepares batches in order).

``--pipeline cpu`` keeps the plain per-image path; ``device`` selects this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from finegrain.data.base import ImageList


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    *,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crop boxes ``[B, 4]`` as ``(x0, y0, w, h)`` in pixels, one per image.

    The algorithm of ``torchvision.transforms.v2.RandomResizedCrop``, vectorised over the batch:
    up to ``attempts`` draws of an area fraction in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; the first that fits the image is placed uniformly; an image where none fits gets
    the central crop with the aspect ratio clamped to ``ratio``.
    """
    b = heights.shape[0]
    h_img, w_img = heights.double().view(b, 1), widths.double().view(b, 1)
    area = h_img * w_img
    u = torch.rand(b, attempts, 4, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    pick = first.clamp_min(0).view(b, 1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    # torch.randint(0, n + 1) is floor(u * (n + 1)) for a uniform u
    y0 = torch.floor(u[..., 2].gather(1, pick).squeeze(1) * (h_img.squeeze(1) - h + 1))
    x0 = torch.floor(u[..., 3].gather(1, pick).squeeze(1) * (w_img.squeeze(1) - w + 1))
    # fallback: central crop with the aspect ratio clamped into ``ratio``
    hi, wi = h_img.squeeze(1), w_img.squeeze(1)
    in_ratio = wi / hi
    fw = torch.where(in_ratio < ratio[0], wi, torch.where(in_ratio > ratio[1], torch.round(hi * ratio[1]), wi))
    fh = torch.where(in_ratio < ratio[0], torch.round(wi / ratio[0]), hi)
    fail = first < 0
    w, h = torch.where(fail, fw, w), torch.where(fail, fh, h)
    x0 = torch.where(fail, torch.div(wi - fw, 2, rounding_mode="floor"), x0)
    y0 = torch.where(fail, torch.div(hi - fh, 2, rounding_mode="floor"), y0)
    return torch.stack([x0, y0, w, h], 1).float()


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, img_size: int, crop_pct: float) -> torch.Tensor:
    """The box of "resize the short side to ``floor(img_size / crop_pct)``, center-crop ``img_size``",
    in the original image's pixels, as ``(x0, y0, w, h)`` (the eval transform)."""
    resize = math.floor(img_size / crop_pct)
    short = torch.minimum(heights, widths).double()
    side = img_size * short / resize
    x0 = (widths.double() - side) / 2
    y0 = (heights.double() - side) / 2
    return torch.stack([x0, y0, side, side], 1).float()


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (``(x0, y0, w, h)``, one per image) out of a padded batch and resize to ``size``.

    ``images`` is ``[B, C, H, W]`` (any dtype; computed in float32). One ``roi_align`` call with
    adaptive sampling: each output pixel averages ``ceil(box / size)^2`` bilinear samples, which
    anti-aliases when shrinking.
    """
    b = images.shape[0]
    rois = torch.cat([torch.arange(b, device=images.device, dtype=torch.float32).view(b, 1),
                      boxes[:, :2].to(images.device), (boxes[:, :2] + boxes[:, 2:]).to(images.device)], 1)
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[3, h, w]`` images of different sizes into ``[B, 3, H, W]`` (zero padded) + sizes ``[B, 2]``."""
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], hmax, wmax))
    for k, im in enumerate(images):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
    return out, sizes


class DeviceAugment(nn.Module):
    """Random resized crop, horizontal flip, colour jitter and normalisation of a padded uint8 batch.

    Args:
        img_size: output size.
        scale_min: smallest crop area fraction (as ``--scale-min``).
        jitter: brightness/contrast/saturation strength (factors drawn from ``[1 - j, 1 + j]``;
            0 turns it off). The three are applied in this fixed order.
        mean, std: normalisation (0-1 scale).
        train: False gives the eval transform instead (resize + center crop with ``crop_pct``).
    """

    def __init__(self, img_size: int, *, scale_min: float = 0.25, jitter: float = 0.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                 train: bool = True, crop_pct: float = 0.875):
        super().__init__()
        self.img_size, self.scale_min, self.jitter, self.train_mode, self.crop_pct = img_size, scale_min, jitter, train, crop_pct
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        h, w = sizes[:, 0].cpu(), sizes[:, 1].cpu()
        if self.train_mode:
            boxes = sample_crop_boxes(h, w, scale=(self.scale_min, 1.0))
        else:
            boxes = center_crop_boxes(h, w, self.img_size, self.crop_pct)
        x = crop_resize(images, boxes, self.img_size)
        if self.train_mode:
            b = x.shape[0]
            flip = torch.rand(b) < 0.5
            x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(3), x)
            if self.jitter > 0:
                x = self._jitter(x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.clamp(0, 255) - mean) / std

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = (1 + self.jitter * (2 * torch.rand(b, 3) - 1)).to(x.device).view(b, 3, 1, 1, 1)
        gray_w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * f[:, 0]).clamp(0, 255)  # brightness
        mean_gray = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean_gray) * f[:, 1] + mean_gray).clamp(0, 255)  # contrast
        gray = (x * gray_w).sum(1, keepdim=True)
        return ((x - gray) * f[:, 2] + gray).clamp(0, 255)  # saturation


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode encoded images (1-D uint8 tensors) to ``[3, H, W]`` uint8 on ``device``.

    All files go to the device decoder (nvJPEG on CUDA) in one call; if that fails, each file is
    tried alone, and a file the device decoder refuses (CMYK, PNG, odd progressive JPEGs) is
    decoded on the CPU and copied over. A file no decoder reads becomes ``None``.
    """
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                out.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
            except RuntimeError:
                out.append(None)
    return out


class EncodedImageDataset(Dataset):
    """Items ``{"data": encoded bytes, "label", "index"}``: the workers read files, nothing more."""

    def __init__(self, images: ImageList):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as e:
            return {"skipped": path, "error": f"{type(e).__name__}: {e}"}
        return {"data": data, "label": self.images.labels[i], "index": i, "path": path}


def collate_device(items: list[dict]) -> dict:
    """Collate for the device pipeline: encoded bytes stay a list; decoded images are padded into a batch."""
    good = [it for it in items if "skipped" not in it]
    skipped = [(it["skipped"], it["error"]) for it in items if "skipped" in it]
    out = {"label": torch.tensor([it["label"] for it in good], dtype=torch.long),
           "index": torch.tensor([it["index"] for it in good], dtype=torch.long), "skipped": skipped}
    if good and "data" in good[0]:
        out["data"], out["paths"] = [it["data"] for it in good], [it["path"] for it in good]
    elif good:
        out["image"], out["sizes"] = pad_batch([it["image"] for it in good])
    else:
        out["image"] = None
    return out


def device_batch(batch: dict, device: torch.device, augment: DeviceAugment) -> dict:
    """Finish a ``collate_device`` batch on ``device``: decode if needed, then crop, flip, jitter, normalise."""
    skipped = list(batch["skipped"])
    labels = batch["label"]
    if "data" in batch:
        decoded = decode_jpegs(batch["data"], device)
        keep = [k for k, im in enumerate(decoded) if im is not None]
        skipped += [(batch["paths"][k], "unreadable image") for k, im in enumerate(decoded) if im is None]
        if not keep:
            return {"image": None, "label": None, "index": None, "skipped": skipped}
        images, sizes = pad_batch([decoded[k] for k in keep])
        labels, index = labels[keep], batch["index"][keep]
    else:
        if batch["image"] is None:
            return {**batch, "skipped": skipped}
        images, sizes, index = batch["image"].to(device, non_blocking=True), batch["sizes"], batch["index"]
    return {"image": augment(images, sizes), "label": labels.to(device, non_blocking=True),
            "index": index, "skipped": skipped}


class DevicePrefetcher:
    """Iterate ``loader`` and finish each batch with ``prepare``; on CUDA the next batch is prepared
    on a side stream while the caller trains on the current one."""

    def __init__(self, loader: Iterable[dict], device: torch.device, prepare: Callable[[dict], dict]):
        self.loader, self.device, self.prepare = loader, device, prepare

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self.prepare(batch)
            return
        stream = torch.cuda.Stream(self.device)
        it = iter(self.loader)

        def ahead():
            try:
                batch = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self.prepare(batch)

        nxt = ahead()
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            current = nxt
            for v in current.values():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    v.record_stream(torch.cuda.current_stream(self.device))
            nxt = ahead()
            yield current


def eval_batches(images: ImageList, prep: dict, device: torch.device, *, pipeline: str, transform, batch_size: int,
                 workers: int) -> Iterable[dict]:
    """Batches for ``predict_loader``: the per-image ``transform`` in workers (``pipeline="cpu"``),
    or files read by workers and decoded, resized and center-cropped on the device (``"device"``).

    The device path's crop is centred exactly and resampled bilinearly, so its pixels differ
    slightly from the CPU transform's (which rounds the crop offset and may be bicubic).
    """
    from torch.utils.data import DataLoader

    from finegrain.data.dataset import ImageDataset, collate

    if pipeline == "cpu":
        return DataLoader(ImageDataset(images, transform), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    augment = DeviceAugment(prep["img_size"], train=False, crop_pct=prep.get("crop_pct", 0.875), mean=prep["mean"], std=prep["std"])
    loader = DataLoader(EncodedImageDataset(images), batch_size=batch_size, num_workers=workers, collate_fn=collate_device)
    return DevicePrefetcher(loader, device, lambda b: device_batch(b, device, augment))

"""Common image corruptions at five severities, after "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", Hendrycks & Dietterich, arXiv:1903.12261 (ImageNet-C).

Each corruption takes a PIL image (or a uint8 ``[3, H, W]`` tensor) and a severity in ``0..5``;
severity 0 returns the input unchanged. Random corruptions draw from ``numpy.random.default_rng(seed)``,
so the same image, severity and seed always give the same output. Output size equals input size.
The severity parameters are ours (chosen so that severity 5 is clearly damaging at 224 px), not
ImageNet-C's exact constants.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from finegrain.registry import Registry

Corruption = Callable[[Image.Image, int, np.random.Generator], Image.Image]
CORRUPTIONS: Registry[Corruption] = Registry("corruption")
MAX_SEVERITY = 5

# One value per severity 1..5.
PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # std, fraction of the 0..255 range
    "gaussian_blur": (0.5, 1.0, 1.5, 2.0, 3.0),  # sigma in pixels at 224 px, scaled with image size
    "jpeg": (80, 60, 40, 20, 10),  # quality
    "brightness": (1.15, 1.3, 1.45, 1.6, 1.8),  # PIL brightness factor
    "contrast": (0.75, 0.6, 0.45, 0.3, 0.2),  # PIL contrast factor
    "occlusion": (0.05, 0.1, 0.2, 0.3, 0.4),  # area fraction erased
    "rotation": (5, 10, 15, 25, 35),  # degrees, random sign
}


def _param(name: str, severity: int) -> float:
    return PARAMS[name][severity - 1]


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Additive pixel-wise Gaussian noise."""
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, 255.0 * _param("gaussian_noise", severity), a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur whose sigma scales with the short side (defined at 224 px)."""
    sigma = _param("gaussian_blur", severity) * min(img.size) / 224.0
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


@CORRUPTIONS.register("jpeg")
def jpeg(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at decreasing quality."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(_param("jpeg", severity)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@CORRUPTIONS.register("brightness")
def brightness(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Brighter image (over-exposure)."""
    return ImageEnhance.Brightness(img).enhance(_param("brightness", severity))


@CORRUPTIONS.register("contrast")
def contrast(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Contrast pulled toward the mean grey."""
    return ImageEnhance.Contrast(img).enhance(_param("contrast", severity))


@CORRUPTIONS.register("occlusion")
def occlusion(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Random erasing: one rectangle of the severity's area fraction, filled with uniform noise.

    The aspect ratio is drawn from ``[1/2, 2]`` and clipped to the image, so the erased area is
    the requested fraction up to rounding (exactly so for square images and moderate fractions).
    """
    a = np.array(img)
    h, w = a.shape[:2]
    area = _param("occlusion", severity) * h * w
    if area <= 0:
        return img.copy()
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    eh = int(round(min(h, max(1.0, np.sqrt(area * aspect)))))
    ew = int(round(min(w, max(1.0, area / eh))))
    top = int(rng.integers(0, h - eh + 1))
    left = int(rng.integers(0, w - ew + 1))
    a[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew) + a.shape[2:], dtype=np.uint8)
    return Image.fromarray(a)


@CORRUPTIONS.register("rotation")
def rotation(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Rotation about the centre by the severity's angle with a random sign; corners filled black."""
    angle = _param("rotation", severity) * (1 if rng.random() < 0.5 else -1)
    return img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))


def corrupt(img: Image.Image | torch.Tensor, name: str, severity: int, *, seed: int = 0) -> Image.Image | torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (0 = unchanged, 1..5).

    Args:
        img: RGB PIL image or uint8 tensor ``[3, H, W]``; the output has the same type and size.
        name: one of :data:`CORRUPTIONS`.
        severity: 0..5.
        seed: the random draws (noise, erased box, rotation sign) depend only on this.
    """
    fn = CORRUPTIONS.get(name)
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an integer in 0..{MAX_SEVERITY}, got {severity!r}")
    is_tensor = isinstance(img, torch.Tensor)
    if is_tensor:
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise TypeError(f"expected a uint8 tensor [3, H, W], got {img.dtype} {tuple(img.shape)}")
        pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
    elif isinstance(img, Image.Image):
        pil = img.convert("RGB")
    else:
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(img).__name__}")
    if severity == 0:
        return img.clone() if is_tensor else pil.copy()
    out = fn(pil, int(severity), np.random.default_rng(seed))
    if is_tensor:
        return torch.from_numpy(np.array(out.convert("RGB"))).permute(2, 0, 1).contiguous()
    return out

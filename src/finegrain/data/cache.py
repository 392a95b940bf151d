"""A decoded-image cache: decode and resize every image once, reuse the pixels across epochs and runs.

JPEG decoding, not the network, sets the pace of fine-grained training at 448 px. The cache
stores each image as uint8 HWC pixels, resized so its short side is ``short_side`` (default
1.15 x the crop size), in one memory-mapped file, with a JSON index of offsets, shapes and CRC32
checksums. The key of a cache folder hashes the image paths, their sizes and modification times,
the short side and the cache format, so changed data or another size gets a new cache; a
truncated or corrupt cache fails its checks on open and is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from finegrain.data.base import ImageList

CACHE_VERSION = 1


def cache_key(images: ImageList, short_side: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{short_side}".encode())
    for p in images.paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:20]


def _decode_resized(args: tuple[str, int]) -> tuple[bytes, int, int, str]:
    path, short_side = args
    try:
        with Image.open(path) as im:
            im.draft("RGB", (short_side, short_side))  # JPEG: decode at a reduced scale when possible
            im = im.convert("RGB")
            w, h = im.size
            scale = short_side / min(w, h)
            if scale < 1:
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        return arr.tobytes(), arr.shape[0], arr.shape[1], ""
    except Exception as e:  # noqa: BLE001  (an unreadable image becomes an empty entry)
        return b"", 0, 0, f"{type(e).__name__}: {e}"


class DecodedCache:
    """Memory-mapped decoded images; ``get(i)`` returns a ``[3, H, W]`` uint8 tensor or None."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self.entries = self.index["entries"]
        self._data: np.memmap | None = None

    @property
    def data(self) -> np.memmap:
        if self._data is None:  # opened lazily, so each DataLoader worker maps it itself
            self._data = np.memmap(self.folder / "data.u8", dtype=np.uint8, mode="r")
        return self._data

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> torch.Tensor | None:
        e = self.entries[i]
        if not e["h"]:
            return None
        n = e["h"] * e["w"] * 3
        arr = np.asarray(self.data[e["offset"] : e["offset"] + n]).reshape(e["h"], e["w"], 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def verify(self) -> str | None:
        """Return why the cache is unusable (truncated, corrupt), or None if it checks out."""
        path = self.folder / "data.u8"
        if not path.exists() or path.stat().st_size != self.index["data_bytes"]:
            return f"{path} is truncated ({path.stat().st_size if path.exists() else 0} of {self.index['data_bytes']} bytes)"
        for e in self.entries:
            if e["h"]:
                n = e["h"] * e["w"] * 3
                if zlib.crc32(memoryview(self.data[e["offset"] : e["offset"] + n])) != e["crc32"]:
                    return f"checksum mismatch for {e['path']} in {path}"
        return None


def open_or_build_cache(images: ImageList, cache_dir: str | Path, short_side: int, *, workers: int = 1) -> DecodedCache:
    """Return a verified cache of ``images`` at ``short_side``, building (or rebuilding) it if needed.

    Raises:
        OSError: when ``cache_dir`` lacks the disk space the cache needs (says how much and where).
    """
    from finegrain.utils import console, progress_bar

    folder = Path(cache_dir) / cache_key(images, short_side)
    if (folder / "index.json").exists():
        try:
            cache = DecodedCache(folder)
            problem = cache.verify() if cache.index.get("version") == CACHE_VERSION else "old cache format"
        except (ValueError, KeyError, OSError) as e:
            problem = f"unreadable index: {e}"
        if problem is None:
            return cache
        console.print(f"[yellow]decoded cache {folder} is unusable ({problem}); rebuilding")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    estimate = int(len(images) * short_side * short_side * 1.5 * 3)  # aspect ratios up to ~1.5 on average
    free = shutil.disk_usage(folder).free
    if free < estimate:
        shutil.rmtree(folder)
        raise OSError(f"the decoded cache needs about {estimate / 2**30:.2f} GiB but {folder.parent} has "
                      f"{free / 2**30:.2f} GiB free; pass another --cache-dir or turn --cache off")
    entries, offset = [], 0
    tmp = folder / "data.u8.tmp"
    jobs = [(p, short_side) for p in images.paths]
    with open(tmp, "wb") as f, progress_bar("building decoded cache", total=len(jobs)) as bar:
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
        results = pool.map(_decode_resized, jobs, chunksize=16) if pool else map(_decode_resized, jobs)
        for path, (buf, h, w, err) in zip(images.paths, results):
            entries.append({"path": path, "offset": offset, "h": h, "w": w, "crc32": zlib.crc32(buf), "error": err})
            f.write(buf)
            offset += len(buf)
            bar.advance(1)
        if pool:
            pool.shutdown()
    os.replace(tmp, folder / "data.u8")
    index = {"version": CACHE_VERSION, "short_side": short_side, "data_bytes": offset, "entries": entries}
    (folder / "index.json.tmp").write_text(json.dumps(index))
    os.replace(folder / "index.json.tmp", folder / "index.json")  # the index last: a cache without one is incomplete
    return DecodedCache(folder)


class CachedImageDataset(Dataset):
    """Items like :class:`finegrain.data.dataset.ImageDataset`, read from a decoded cache.

    ``transform`` works on uint8 ``[3, H, W]`` tensors and should end in uint8 (normalisation is
    done per batch on the device by the training loop), e.g. crop + flip from torchvision v2.
    """

    def __init__(self, cache: DecodedCache, labels: list[int], transform, indices: list[int] | None = None):
        self.cache, self.labels, self.transform = cache, labels, transform
        self.indices = list(range(len(labels))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        img = self.cache.get(j)
        if img is None:
            e = self.cache.entries[j]
            return {"skipped": e["path"], "error": e.get("error", "unreadable")}
        return {"image": self.transform(img), "label": self.labels[j], "index": i}

"""Training throughput: finegrain's pipeline against a plain torchvision loop, in one process.

Three measurements on the same images, model and batch size:

- compute-only: random tensors already on the device, forward + backward + step (the ceiling);
- finegrain: the shared training loop (``train_one_epoch``) fed by finegrain's loader, with
  channels_last and bf16 autocast on GPU as the defaults set;
- torchvision: ``ImageFolder`` + ``DataLoader`` + a plain loop in fp32, contiguous layout.

Usage: python benchmarks/throughput.py --model efficientnet_lite0 --img-size 224 --steps 20
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from _common import SHARED, print_table, write_results
from finegrain.data.datasets import open_dataset
from finegrain.data.cache import CachedImageDataset, open_or_build_cache
from finegrain.data.loader import ImageDataset, collate
from finegrain.data.transforms import train_transform
from finegrain.tasks import build_task
from finegrain.train.loop import train_one_epoch
from finegrain.utils import resolve_device


def _take(loader, steps):
    for i, batch in enumerate(loader):
        if i >= steps:
            return
        yield batch


def compute_only(model, device, bs, size, steps, channels_last, amp):
    x = torch.randn(bs, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return bs * steps / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model, images, device, bs, size, steps, workers, channels_last, amp, cache_dir=None):
    task = build_task("supervised", model, len(images.classes), label_smoothing=0.1)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    if cache_dir:
        cache = open_or_build_cache(images, cache_dir, round(1.15 * size), workers=max(1, workers))
        data = CachedImageDataset(cache, images.labels, train_transform(size, normalize=False))
    else:
        data = ImageDataset(images, train_transform(size))
    loader = DataLoader(data, batch_size=bs, shuffle=True, num_workers=workers,
                        collate_fn=collate, drop_last=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    kw = dict(device=device, amp=amp, channels_last=channels_last, normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    train_one_epoch(task, _take(loader, 2), opt, None, **kw)  # warm-up
    r = train_one_epoch(task, _take(loader, steps), opt, None, **kw)
    _sync(device)
    return r["images_per_s"]


def plain(model, root, device, bs, size, steps, workers):
    t = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                    v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = DataLoader(ImageFolder(root, transform=t), batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(loader)
    for _ in range(2):  # warm-up
        x, y = next(it)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        n += x.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(SHARED / "flowers12" / "train"))
    ap.add_argument("--cache-dir", default="/tmp/finegrain-bench-cache")
    args = ap.parse_args()
    device = resolve_device("auto")
    images = open_dataset(args.data, "train")
    make = lambda: timm.create_model(args.model, num_classes=len(images.classes)).to(device)  # noqa: E731
    rows = []
    cl, amp = True, True
    r_compute = compute_only(make().to(memory_format=torch.channels_last), device, args.batch_size, args.img_size, args.steps, cl, amp)
    r_ours = ours(make(), images, device, args.batch_size, args.img_size, args.steps, args.workers, cl, amp)
    t0 = time.perf_counter()
    open_or_build_cache(images, args.cache_dir, round(1.15 * args.img_size), workers=max(1, args.workers))
    cache_seconds = time.perf_counter() - t0
    r_cached = ours(make(), images, device, args.batch_size, args.img_size, args.steps, args.workers, cl, amp, args.cache_dir)
    r_plain = plain(make(), args.data, device, args.batch_size, args.img_size, args.steps, args.workers)
    for name, r in (("compute-only (data on device)", r_compute), ("finegrain pipeline", r_ours),
                    ("finegrain + decoded cache", r_cached), ("torchvision ImageFolder + DataLoader", r_plain)):
        rows.append({"pipeline": name, "images/s": r, "vs torchvision": r / r_plain})
    print_table(rows, ["pipeline", "images/s", "vs torchvision"])
    path = write_results(f"throughput-{args.model}-{args.img_size}", {
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
        "workers": args.workers, "data": args.data, "device": str(device), "rows": rows,
        "cache_build_seconds_or_reuse": cache_seconds,
        "ratio_ours_vs_torchvision": r_ours / r_plain, "ratio_cached_vs_torchvision": r_cached / r_plain,
        "ratio_cached_vs_compute": r_cached / r_compute})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

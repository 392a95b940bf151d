"""Training throughput: finegrain's pipelines against timm's and torchvision's, in one process.

For each model, on the same image files, batch size and device:

- compute-only: random tensors already on the device, forward + backward + step with finegrain's
  step settings (channels_last, bf16 autocast where it is on by default), eager, and compiled
  with ``--compile`` (the anchor of the GPU target);
- finegrain, as ``fit`` builds it (``build_train_data`` + ``train_one_epoch``): the CPU pipeline
  (Pillow in loader workers), the CPU pipeline on the decoded cache, and the device pipeline
  (nvJPEG decode or cache slices, batched crop/flip/normalise on the device) with and without
  the cache;
- timm's ``create_loader`` (its prefetcher on CUDA) and torchvision ``ImageFolder`` + ``DataLoader``,
  each with a plain fp32 loop in the default memory layout.

Usage (CPU): python benchmarks/throughput.py --models efficientnet_lite0 --img-size 224 --steps 10
Usage (GPU): python benchmarks/throughput.py --models resnet50 vit_base_patch16_224 --img-size 448 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from _common import SHARED, print_table, write_results
from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from finegrain.data.base import open_dataset
from finegrain.data.cache import open_or_build_cache
from finegrain.data.device import DevicePrefetcher
from finegrain.tasks import build_task
from finegrain.train.distributed import World
from finegrain.train.loop import autocast, train_one_epoch
from finegrain.train.plan import make_plan
from finegrain.train.run import build_train_data
from finegrain.utils import resolve_device

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _take(loader, steps):
    for i, batch in enumerate(loader):
        if i >= steps:
            return
        yield batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make(name, num_classes, device, size):
    kw = {"img_size": size} if "vit" in name else {}
    return timm.create_model(name, num_classes=num_classes, **kw).to(device)


def compute_only(model, device, bs, size, steps, compile_):
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    f = torch.compile(model) if compile_ else model
    for i in range(steps + 5):
        if i == 5:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, True, cpu=True):
            loss = F.cross_entropy(f(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return bs * steps / (time.perf_counter() - t0)


def ours(model, images, device, args, pipeline, cache, compile_):
    cfg = RunConfig(DataConfig(data=args.data, img_size=args.img_size, batch_size=args.batch_size, workers=args.workers,
                               pipeline=pipeline, cache=cache, cache_dir=args.cache_dir, mean=MEAN, std=STD),
                    ModelConfig(backbone=args.model), TrainConfig(device=str(device)))
    cfg.check()
    prep = {"img_size": args.img_size, "mean": MEAN, "std": STD, "interpolation": "bilinear", "crop_pct": 0.875}
    plan = dataclasses.replace(make_plan(cfg, World(), device), preprocessing=prep)
    data, collate_fn, prepare = build_train_data(plan, images, list(range(len(images))))
    task = build_task("supervised", model, len(images.classes), label_smoothing=0.1).to(memory_format=torch.channels_last)
    forward = torch.compile(task) if compile_ else task
    workers = args.workers if not (pipeline == "device" and cache) else 0  # cache slices need no worker processes
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=workers, collate_fn=collate_fn,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    if prepare is not None:
        loader = DevicePrefetcher(loader, device, prepare)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4, fused=device.type == "cuda")
    kw = dict(device=device, forward=forward, amp=True, channels_last=True, normalize=(MEAN, STD))
    train_one_epoch(task, _take(loader, 3), opt, None, **kw)  # warm-up (and compilation)
    _sync(device)
    r = train_one_epoch(task, _take(loader, args.steps), opt, None, **kw)
    _sync(device)
    return r["images_per_s"]


def _plain_loop(model, loader, device, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(loader)
    t0, n = None, 0
    for i in range(steps + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        n += x.shape[0] if i >= 2 else 0
    _sync(device)
    return n / (time.perf_counter() - t0)


def torchvision_plain(model, root, device, args):
    t = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(args.img_size, antialias=True), v2.RandomHorizontalFlip(),
                    v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    loader = DataLoader(ImageFolder(root, transform=t), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    return _plain_loop(model, loader, device, args.steps)


def timm_loader(model, root, device, args):
    from timm.data import ImageDataset as TimmDataset
    from timm.data import create_loader

    loader = create_loader(TimmDataset(root), input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size,
                           is_training=True, num_workers=args.workers, device=device, use_prefetcher=device.type == "cuda",
                           mean=MEAN, std=STD, color_jitter=0.0, persistent_workers=args.workers > 0)
    return _plain_loop(model, loader, device, args.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (compute-only and finegrain)")
    ap.add_argument("--data", default=str(SHARED / "flowers12" / "train"))
    ap.add_argument("--cache-dir", default="/tmp/finegrain-bench-cache")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = open_dataset(args.data, "train")
    t0 = time.perf_counter()
    open_or_build_cache(images, args.cache_dir, round(1.15 * args.img_size), workers=max(1, args.workers))
    cache_seconds = time.perf_counter() - t0
    results = []
    for name in args.models:
        args.model = name
        make = functools.partial(_make, name, len(images.classes), device, args.img_size)
        r = {"compute-only (eager)": compute_only(make(), device, args.batch_size, args.img_size, args.steps, False)}
        if args.compile:
            r["compute-only (compiled)"] = compute_only(make(), device, args.batch_size, args.img_size, args.steps, True)
        r["finegrain cpu pipeline"] = ours(make(), images, device, args, "cpu", False, False)
        r["finegrain cpu pipeline + cache"] = ours(make(), images, device, args, "cpu", True, False)
        r["finegrain device pipeline"] = ours(make(), images, device, args, "device", False, False)
        r["finegrain device pipeline + cache"] = ours(make(), images, device, args, "device", True, False)
        if args.compile:
            r["finegrain device pipeline + cache, compiled"] = ours(make(), images, device, args, "device", True, True)
        r["timm create_loader"] = timm_loader(make(), args.data, device, args)
        r["torchvision ImageFolder + DataLoader"] = torchvision_plain(make(), args.data, device, args)
        anchor = r.get("compute-only (compiled)", r["compute-only (eager)"])
        rows = [{"model": name, "pipeline": k, "images/s": v, "vs torchvision": v / r["torchvision ImageFolder + DataLoader"],
                 "vs timm": v / r["timm create_loader"], "vs compute-only": v / anchor} for k, v in r.items()]
        print_table(rows, ["model", "pipeline", "images/s", "vs torchvision", "vs timm", "vs compute-only"])
        results.append({"model": name, "rows": rows})
    tag = f"throughput-{'-'.join(args.models)}-{args.img_size}"
    path = write_results(tag, {
        "models": args.models, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
        "workers": args.workers, "threads": torch.get_num_threads(), "data": args.data, "device": str(device),
        "cache_build_seconds_or_reuse": cache_seconds, "results": results,
        "notes": "finegrain rows use channels_last and bf16 autocast (on CUDA, and on CPUs with native bf16); "
                 "timm and torchvision rows use a plain fp32 loop in the default layout, as their users get it"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Memory of `finegrain serve` under a burst of huge JPEGs: peak RSS, RSS after the burst, latency, status codes.

    .venv/bin/python benchmarks/serve_memory.py                     # 64 clients, 60 s, then 60 s idle
    .venv/bin/python benchmarks/serve_memory.py --clients 16 --seconds 20 --settle 20 --name serve-memory-short

Starts the server as a subprocess (``finegrain.serve.launch.ServerProcess``) on a checkpoint of
EfficientNet-Lite0 at 224 px (built from the shared ImageNet weights unless ``--checkpoint`` is
given), measures its idle resident size after a few warm-up requests, then runs ``--clients``
threads that each POST a 6000x6000 JPEG of about 0.6 MB (a real CUB photo, upscaled) in a loop for
``--seconds``; a client answered 503 waits the ``Retry-After`` it was given. The server's RSS is
sampled from /proc every 50 ms and its kernel high-water mark (VmHWM) is read at the end of the
burst. After ``--settle`` idle seconds the RSS is read again. Targets from issue 13: no 5xx but
explicit 503s, peak RSS under 2 GB, RSS a minute later under 1.2x the idle level.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import SHARED, print_table, write_results
from finegrain.serve.launch import ServerProcess, get_json, post_image


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def huge_jpeg(side: int, target_bytes: int) -> bytes:
    """A real photo (shrunk to 60 px, then upscaled to ``side`` x ``side``: smooth, so it compresses to about
    0.6 MB, near the floor for 36 megapixels) at the JPEG quality that comes closest to ``target_bytes``."""
    photo = next((SHARED / "cub27").rglob("*.jpg"))
    big = Image.open(photo).convert("RGB").resize((60, 60), Image.BOX).resize((side, side), Image.BICUBIC)
    best = None
    for q in (5, 15, 30, 50):
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=q, subsampling=2)
        if best is None or abs(buf.tell() - target_bytes) < abs(len(best) - target_bytes):
            best = buf.getvalue()
    return best


def demo_checkpoint(folder: Path) -> Path:
    from finegrain import checkpoint as ckpt
    from finegrain.models.backbone import create_backbone
    from finegrain.tasks import build_task

    weights = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
    model = create_backbone("efficientnet_lite0", num_classes=200, pretrained=str(weights))
    task = build_task("supervised", model, 200)
    prep = {"img_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
            "interpolation": "bicubic"}
    meta = ckpt.describe(task, model={"backbone": "efficientnet_lite0", "pretrained": str(weights), "task": "supervised"},
                         classes=[f"class_{i:03d}" for i in range(200)], preprocessing=prep)
    return ckpt.save(folder / "lite0.safetensors", task.state_dict(), meta)


def burst(url: str, payload: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads POST ``payload`` until ``seconds`` pass; 503 answers wait their Retry-After."""
    stop_at = time.monotonic() + seconds
    latencies, codes, lock = [], {}, threading.Lock()

    def client() -> None:
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            status, answer = post_image(url + "/predict", payload, timeout=120)
            with lock:
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    latencies.append(1000 * (time.perf_counter() - t))
            if status == 503:
                time.sleep(1.0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pct = (lambda q: float(np.percentile(latencies, q))) if latencies else (lambda q: float("nan"))
    return {"status_codes": {str(k): v for k, v in sorted(codes.items())}, "ok": len(latencies),
            "requests_per_s": len(latencies) / seconds, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: EfficientNet-Lite0 (shared ImageNet weights, 200 classes, 224 px)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=60.0, help="idle seconds before the RSS is read again")
    ap.add_argument("--side", type=int, default=6000, help="the JPEG's width and height")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--name", default="serve-memory")
    args = ap.parse_args(argv)

    payload = huge_jpeg(args.side, 500_000)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or demo_checkpoint(Path(tmp))
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        with ServerProcess(ckpt, "--device", "cpu", env=env, startup_timeout=300) as server:
            pid = server.proc.pid
            for _ in range(4):  # warm up the model and the allocator
                post_image(server.url + "/predict", payload)
            time.sleep(2)
            idle = proc_status(pid, "VmRSS")
            samples, done = [], threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    samples.append(proc_status(pid, "VmRSS"))

            sampler = threading.Thread(target=sample)
            sampler.start()
            r = burst(server.url, payload, args.clients, args.seconds)
            done.set()
            sampler.join()
            hwm = proc_status(pid, "VmHWM")
            time.sleep(args.settle)
            after = proc_status(pid, "VmRSS")
            health = get_json(server.url + "/health")
    five_xx = {k: v for k, v in r["status_codes"].items() if k.startswith("5") and k != "503"}
    gib = 1024 ** 3
    row = {**r, "clients": args.clients, "seconds": args.seconds, "jpeg_bytes": len(payload), "side": args.side,
           "idle_rss_gib": idle / gib, "peak_rss_gib": max(hwm, *samples) / gib, "rss_after_settle_gib": after / gib,
           "settle_s": args.settle, "after_over_idle": after / idle, "other_5xx": sum(five_xx.values()),
           "refused_503": r["status_codes"].get("503", 0), "server_load": health.get("load")}
    row["targets_met"] = bool(row["other_5xx"] == 0 and row["peak_rss_gib"] < 2.0 and row["after_over_idle"] < 1.2)
    print_table([row], ["clients", "ok", "refused_503", "other_5xx", "p50_ms", "p95_ms", "p99_ms", "idle_rss_gib",
                        "peak_rss_gib", "rss_after_settle_gib", "after_over_idle", "targets_met"])
    out = write_results(args.name, {"benchmark": "serve memory under a burst of huge JPEGs", "result": row})
    print(f"wrote {out}")
    return 0 if row["targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

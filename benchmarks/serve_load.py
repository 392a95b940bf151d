"""Load test of `finegrain serve` on this machine: requests/s and latency under concurrent clients.

    .venv/bin/python benchmarks/serve_load.py --checkpoint /tmp/demo-runs/<run>/best.safetensors \
        --data ../shared/data/flowers12

Starts the server as a subprocess on 127.0.0.1 and a free port (``finegrain.serve.launch``),
waits for ``/health``, then for each ``--concurrency`` level sends ``--requests`` real test
images (raw JPEG bodies) from that many client threads, after ``--warmup`` requests. Reports
requests/s, per-request latency p50/p95 and how many images each micro-batch held, and stops
the server (SIGINT, graceful) at the end, also on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import SHARED, print_table, write_results
from finegrain.data.base import open_dataset
from finegrain.serve.launch import ServerProcess, get_json, load_test


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(SHARED / "flowers12"), help="images are taken from its test split")
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16, help="server micro-batch limit")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching window")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server process")
    ap.add_argument("--name", default="serve")
    args = ap.parse_args(argv)

    test = open_dataset(args.data, split="test")
    payloads = [Path(p).read_bytes() for p in test.paths[:: max(1, len(test.paths) // 64)]]
    server_args = ["--device", "cpu", "--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    with ServerProcess(args.checkpoint, *server_args, env=env, startup_timeout=300) as server:
        info = get_json(server.url + "/health")
        load_test(server.url, payloads, requests=args.warmup, concurrency=1)
        for c in args.concurrency:
            r = load_test(server.url, payloads, requests=args.requests, concurrency=c)
            if r["ok"] != r["requests"]:
                raise RuntimeError(f"{r['requests'] - r['ok']} requests failed at concurrency {c}: {r['errors']}")
            rows.append(r)
            print(f"concurrency {c}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
                  f"p95 {r['p95_ms']:.0f} ms, mean batch {r['mean_batch']:.1f}", flush=True)
    print_table(rows, ["concurrency", "requests", "requests_per_s", "p50_ms", "p95_ms", "max_ms", "mean_batch"])
    path = write_results(args.name, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(args.checkpoint), "backbone": info["backbone"], "img_size": info["img_size"],
        "payloads": f"{len(payloads)} JPEGs from {args.data}/test, sent as raw image/jpeg bodies",
        "server": {"batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms, "torch_threads": args.threads,
                   "exit_code": server.returncode},
        "budget": {"requests_per_level": args.requests, "warmup": args.warmup},
        "rows": rows,
        "note": "client and server share the 2 CPU cores (and other engineers' jobs); latency includes upload, "
                "decode, preprocessing and queueing",
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run ``finegrain serve`` in a subprocess and load-test it (for tests and ``benchmarks/serve_load.py``).

Standard library only on the client side (``urllib``), so it measures the server, not a client
library's connection pool.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_json(url: str, *, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_image(url: str, data: bytes, *, content_type: str = "image/jpeg", timeout: float = 60.0) -> tuple[int, dict]:
    """POST a raw image body; return ``(status, json)`` (4xx/5xx answers are returned, not raised)."""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"detail": body.decode(errors="replace")}


class ServerProcess:
    """``finegrain serve CHECKPOINT`` on ``127.0.0.1`` and a free port, as a context manager.

    ``start()`` returns once ``GET /health`` answers (or raises with the server's log tail);
    ``stop()`` sends SIGINT (uvicorn's graceful shutdown), then terminates and finally kills it
    if it does not exit; it is safe to call twice and runs on ``__exit__`` whatever happened.

    Example:
        >>> with ServerProcess("run/best.safetensors", "--max-wait-ms", "20") as server:
        ...     status, answer = post_image(server.url + "/predict", jpeg_bytes)
    """

    def __init__(self, checkpoint: str | Path, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None):
        self.checkpoint, self.args, self.host = str(checkpoint), list(args), host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()
        self._log_text = ""
        self.returncode: int | None = None

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "finegrain", "serve", self.checkpoint, "--host", self.host, "--port", str(self.port),
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait_healthy()
        except BaseException:  # never leave a server behind, whatever stopped the wait
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`finegrain serve` exited with {self.proc.returncode} before answering:\n{self.log()}")
            try:
                if get_json(self.url + "/health", timeout=2).get("status") == "ok":
                    return
            except (OSError, ValueError):
                time.sleep(0.2)
        raise TimeoutError(f"`finegrain serve` did not answer {self.url}/health within {self.startup_timeout} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server's stdout and stderr."""
        if not self._log.closed:
            self._log.seek(0)
            self._log_text = self._log.read().decode(errors="replace")
        return self._log_text[-tail:]

    def stop(self, timeout: float = 15.0) -> int | None:
        """Shut the server down; return its exit code."""
        if self.proc is None:
            return self.returncode
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn: finish open requests, run the app's shutdown
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.returncode = proc.returncode
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log()  # keep the text readable after the file is gone
        self._log.close()


def load_test(url: str, payloads: Sequence[bytes], *, requests: int, concurrency: int,
              content_type: str = "image/jpeg") -> dict:
    """Send ``requests`` POSTs to ``url + "/predict"`` from ``concurrency`` threads (payloads cycled).

    Returns:
        ``requests``, ``ok`` (2xx count), ``errors`` (first few non-2xx answers), ``seconds``,
        ``requests_per_s``, latency ``p50_ms`` / ``p95_ms`` / ``max_ms`` per request, and the
        server's micro-batching counters over the run (``batches``, ``images``, ``mean_batch``).
    """
    if requests < 1 or concurrency < 1 or not payloads:
        raise ValueError(f"need requests >= 1, concurrency >= 1 and payloads, got {requests}, {concurrency}, {len(payloads)}")
    before = get_json(url + "/health")
    latencies: list[float] = []
    statuses: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t = time.perf_counter()
        status, answer = post_image(url + "/predict", payloads[i % len(payloads)], content_type=content_type)
        with lock:
            latencies.append(1000 * (time.perf_counter() - t))
            statuses.append((status, answer))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    after = get_json(url + "/health")
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    return {
        "requests": requests, "concurrency": concurrency, "ok": sum(200 <= s < 300 for s, _ in statuses),
        "errors": [{"status": s, "detail": a.get("detail")} for s, a in statuses if not 200 <= s < 300][:5],
        "seconds": seconds, "requests_per_s": requests / seconds,
        "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
        "max_ms": float(max(latencies)), "batches": batches, "images": images,
        "mean_batch": images / batches if batches else 0.0,
    }

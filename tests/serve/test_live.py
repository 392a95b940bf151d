"""`finegrain serve` as a real process on a socket: a bounded load test, clean shutdown, and the web
page driven in headless Chromium (skipped where Chromium or Playwright is missing).

One server (a tiny random-init checkpoint) is shared by the load and page tests; each start
costs a Python + torch import (a few seconds).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from finegrain.serve.launch import ServerProcess, get_json, load_test, post_image  # noqa: E402

from ..helpers import CLASSES, make_checkpoint  # noqa: E402


def jpeg(color, size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("live") / "m.safetensors")
    # a generous batching window so that concurrent requests meet even on a loaded CI machine
    with ServerProcess(ckpt, "--device", "cpu", "--batch-size", "8", "--max-wait-ms", "50", "--topk", "3") as srv:
        yield srv  # stopped on exit, also when a test failed (and by start() itself if it never came up)


def test_concurrent_load_all_succeed_and_share_batches(server):
    payloads = [jpeg(c, seed=i) for i, c in enumerate([(200, 40, 40), (40, 180, 60), (50, 60, 210), (240, 240, 20)])]
    r = load_test(server.url, payloads, requests=32, concurrency=8)
    assert r["ok"] == 32 and not r["errors"], r
    assert r["images"] == 32 and r["batches"] < 32, r  # micro-batching grouped concurrent requests
    assert r["mean_batch"] > 1 and r["p95_ms"] >= r["p50_ms"] > 0
    status, answer = post_image(server.url + "/predict", b"not an image")
    assert status == 422 and "not a readable image" in answer["detail"]
    assert get_json(server.url + "/health")["status"] == "ok"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_web_page_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (dev extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed")
    image = tmp_path / "flower.jpg"
    image.write_bytes(jpeg((200, 40, 40), size=(160, 120)))
    shot = tmp_path / "page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            assert "test_resnet" in page.text_content("#model")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#topk tr", timeout=30_000)
            page.wait_for_selector("#heatmap-fig:not([hidden])", timeout=30_000)
            page.wait_for_function("document.getElementById('heatmap').complete && "
                                   "document.getElementById('heatmap').naturalWidth > 0")
            rows = page.locator("#topk tr")
            assert rows.count() == 3  # --topk 3
            names = [rows.nth(i).locator("td").first.text_content() for i in range(3)]
            assert sorted(names) == sorted(CLASSES)
            scores = [float(rows.nth(i).locator("td.score").text_content().rstrip("%")) for i in range(3)]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 100) < 0.5
            assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") == 32  # the 32 px eval crop
            assert names[0] in page.text_content("#heatmap-caption")
            assert page.is_visible("#preview") and not page.locator(".err").count() and not errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 5_000
    keep = os.environ.get("FINEGRAIN_SCREENSHOTS")
    if keep:  # look at it: FINEGRAIN_SCREENSHOTS=/tmp/shots pytest tests/serve/test_live.py
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "serve-page.png")


def test_server_stops_cleanly_and_frees_the_port(server):
    """Last in the module: stop the shared server (the fixture's finalizer is then a no-op)."""
    assert post_image(server.url + "/predict", jpeg((200, 40, 40)))[0] == 200
    assert server.stop() == 0, server.log()  # SIGINT -> uvicorn's graceful shutdown -> exit 0
    assert "Application shutdown complete" in server.log()
    with pytest.raises(OSError):
        get_json(server.url + "/health", timeout=2)

"""`finegrain serve` as a real process on a socket: a bounded load test, clean shutdown, and the web
page driven in headless Chromium (skipped where Chromium or Playwright is missing).

One server (a tiny random-init checkpoint) is shared by the load and page tests; each start
costs a Python + torch import (a few seconds).
"""

from __future__ import annotations

import contextlib
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

from ..helpers import CLASSES, make_checkpoint, task_checkpoint  # noqa: E402

CUB = Path(__file__).resolve().parents[3] / "shared" / "data" / "cub27" / "CUB_200_2011" / "images"


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


def _playwright_and_chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (dev extra)")
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed")
    return sync_api, exe


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def _page(sync_api, exe: str, url: str, viewport: dict):
    """A page of headless Chromium at ``url`` and the list its uncaught errors go to; the browser closes after."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=viewport)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


def _keep(shot: Path, name: str) -> None:
    keep = os.environ.get("FINEGRAIN_SCREENSHOTS")
    if keep:  # look at it: FINEGRAIN_SCREENSHOTS=/tmp/shots pytest tests/serve/test_live.py
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / name)


def test_web_page_in_headless_chromium(server, tmp_path):
    sync_api, exe = _playwright_and_chromium()
    image = tmp_path / "flower.jpg"
    image.write_bytes(jpeg((200, 40, 40), size=(160, 120)))
    shot = tmp_path / "page.png"
    with _page(sync_api, exe, server.url + "/", {"width": 900, "height": 760}) as (page, errors):
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
    assert shot.stat().st_size > 5_000
    _keep(shot, "serve-page.png")


# Per object, on the page's canvas: pixels of its colour (COLORS in the page) beyond those of the plain image
# drawn the same way without boxes, and how many pixels differ from the plain image at all.
_CANVAS_PIXELS = """([colors, w, h]) => {
  const c = document.getElementById("boxes");
  const plain = document.createElement("canvas"); plain.width = w; plain.height = h;
  const pctx = plain.getContext("2d"); pctx.drawImage(document.getElementById("preview"), 0, 0, w, h);
  const a = c.getContext("2d").getImageData(0, 0, w, h).data, b = pctx.getImageData(0, 0, w, h).data;
  const rgb = colors.map(s => [1, 3, 5].map(i => parseInt(s.slice(i, i + 2), 16)));
  const near = (d, i, [r, g, bl]) => Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - bl) < 12;
  const extra = rgb.map(() => 0); let changed = 0;
  for (let i = 0; i < a.length; i += 4) {
    if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) changed++;
    rgb.forEach((col, k) => { extra[k] += near(a, i, col) - near(b, i, col); });
  }
  return {extra, changed, size: [c.width, c.height], shown: [c.clientWidth, c.clientHeight]};
}"""


def test_detect_page_in_headless_chromium(tmp_path):
    """``serve CLASSIFIER --detector DETECTOR``: the page draws a box and a label per object on the canvas and lists them."""
    sync_api, exe = _playwright_and_chromium()
    photos = sorted(CUB.rglob("*.jpg"))[:1] if CUB.is_dir() else []
    image = tmp_path / "bird.jpg"
    image.write_bytes(photos[0].read_bytes() if photos else jpeg((90, 120, 60), size=(320, 240)))
    det = task_checkpoint(tmp_path / "det.safetensors", "detection", ["bird", "car"])
    cls = task_checkpoint(tmp_path / "cls.safetensors", "supervised", ["red", "green", "blue", "grey"], size=32)
    shot = tmp_path / "detect.png"
    # a random-init detector scores its boxes low: keep them all, the 3 best, for a readable picture
    with ServerProcess(cls, "--device", "cpu", "--topk", "3", "--detector", str(det), "--score-threshold", "0",
                       "--max-objects", "3") as srv:
        status, want = post_image(srv.url + "/detect", image.read_bytes())
        assert status == 200, want
        n = len(want["objects"])
        assert n == 3, want  # the test needs objects to draw
        assert (want["width"], want["height"]) == Image.open(image).size
        with _page(sync_api, exe, srv.url + "/", {"width": 900, "height": 1000}) as (page, errors):
            page.wait_for_function("document.getElementById('model').textContent.includes('detector of bird, car')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#detect-fig:not([hidden])", timeout=60_000)
            page.wait_for_selector("#objects tr", timeout=30_000)
            page.wait_for_selector("#heatmap-fig:not([hidden])", timeout=60_000)  # the page's last step: all drawn
            assert page.text_content("#detect-caption").startswith(f"{n} objects detected (detector score >= 0")
            rows = page.locator("#objects tr")
            assert rows.count() == n
            for i, o in enumerate(want["objects"]):  # same image, same deterministic models: the same objects in order
                cells = rows.nth(i).locator("td")
                assert cells.nth(1).text_content() == f"{i + 1}. {o['class']}"
                assert cells.nth(2).text_content() == f"{100 * o['prob']:.1f}%"
                assert cells.nth(4).text_content() == f"{o['detector_label']} {o['score']:.2f}"
            colors = page.evaluate("COLORS")[:n]
            px = page.evaluate(_CANVAS_PIXELS, [colors, want["width"], want["height"]])
            assert px["size"] == [want["width"], want["height"]]  # drawn at the image's own pixels (the boxes' units)
            assert 0 < px["shown"][0] <= 900 and px["shown"][1] > 0  # scaled down to the page, not cropped off it
            assert px["changed"] > 200 * n, px  # boxes and labels drawn over the image
            assert all(e > 50 for e in px["extra"]), px  # every object's colour: its outline and label background
            assert page.text_content("#topk caption") == "Whole image"  # the two tables told apart
            assert page.text_content("#objects caption").startswith("Detected objects")
            assert not page.locator(".err").count() and not errors, errors
            page.screenshot(path=str(shot), full_page=True)
            # a box at the right edge with a long class name: its label is moved left to stay on the canvas
            left = page.evaluate(_LABEL_AT_RIGHT_EDGE, [want["width"], want["height"]])
            assert left > 500, left
            assert not errors, errors
    assert shot.stat().st_size > 5_000
    _keep(shot, "serve-detect-page.png")


# Pixels of the first object's colour left of its box, once drawn near the canvas's right edge.
_LABEL_AT_RIGHT_EDGE = """([w, h]) => {
  const x0 = w - 20, y0 = Math.round(h / 2);
  drawBoxes(document.getElementById("preview"), {width: w, height: h, objects: [
    {box: [x0, y0, w - 2, y0 + 30], class: "Black_footed_Albatross", prob: 0.5}]});
  const d = document.getElementById("boxes").getContext("2d").getImageData(0, 0, x0 - 1, h).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) n += Math.abs(d[i] - 0xe6) + Math.abs(d[i + 1] - 0x19) + Math.abs(d[i + 2] - 0x4b) < 12;
  return n;
}"""


def test_server_stops_cleanly_and_frees_the_port(server):
    """Last in the module: stop the shared server (the fixture's finalizer is then a no-op)."""
    assert post_image(server.url + "/predict", jpeg((200, 40, 40)))[0] == 200
    assert server.stop() == 0, server.log()  # SIGINT -> uvicorn's graceful shutdown -> exit 0
    assert "Application shutdown complete" in server.log()
    with pytest.raises(OSError):
        get_json(server.url + "/health", timeout=2)

"""FastAPI app factory: ``POST /predict``, ``POST /explain``, ``GET /labels``, ``GET /health`` and a page at ``/``;
with a detector, ``POST /detect`` too (detect, then classify each object: :mod:`finegrain.serve.detect`).

Requests are decoded and preprocessed in the threadpool (in parallel), then a single worker
thread gathers them into micro-batches (up to ``batch_size`` images, waiting at most
``max_wait_ms`` for company) and runs ``Predictor.logits`` on each batch. Only that thread
touches the model, so inference is thread-safe, and concurrent clients share batches.

Untrusted input is checked before it costs anything: the upload size (``Content-Length`` and the
bytes actually read), the content type, and the pixel count from the image header (decompression
bombs) before any pixel is decoded. Each problem is a 4xx answer with a ``detail`` that says what
was wrong and what is accepted.

Memory is bounded under load: JPEGs are decoded reduced to near the model's input size, at most
``decode_slots`` images are decoded at once, at most ``max_inflight`` requests are in progress
(503 with ``Retry-After`` past that), and freed memory goes back to the OS when the server is
idle (:mod:`finegrain.serve.limits`).
"""

import asyncio
import io
import math
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from finegrain.predict import Answering, Predictor
from finegrain.serve.limits import Busy, RequestGate

MULTIPART = "multipart/form-data"


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"serving needs the 'serve' extra: pip install 'finegrain[serve]' ({e})") from e


class InputError(Exception):
    """A client error: ``status`` (4xx, or 503 with ``Retry-After``) and a message for the ``detail`` field."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def decode_image(data: bytes, *, max_pixels: int, min_side: int | None = None):
    """Decode untrusted bytes into an RGB PIL image, or raise :class:`InputError`.

    The pixel count is read from the header and checked against ``max_pixels`` before decoding.
    With ``min_side``, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose
    sides are still at least ``min_side`` (Pillow's ``draft``: a 6000x6000 photo costs 1/64 of
    the memory and time when the model needs 256 px); ``info["original_size"]`` keeps the size
    the file declares.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(422, "the upload is empty; send an image file (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap is checked next
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(413, f"image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                                      "(--max-pixels); resize it first")
            im.draft("RGB", (min_side, min_side) if min_side else (w, h))  # other formats ignore it
            im.load()
            rgb = im.convert("RGB")
            rgb.info["original_size"] = (w, h)
            return rgb
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(413, f"image refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise InputError(422, "the upload is not a readable image (JPEG, PNG, WebP, BMP, GIF or TIFF)") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise InputError(422, f"cannot decode the image (truncated or corrupt?): {e}") from e


class MicroBatcher:
    """One worker thread that runs ``predictor.outputs`` (scaled logits, and features when the kNN score needs
    them) on batches gathered from a queue."""

    def __init__(self, predictor: Predictor, *, batch_size: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256):
        self.predictor = predictor
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.model_lock = threading.Lock()  # held while the model runs; other users of the model take it too
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="finegrain-batcher", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=10)
            self._thread = None

    def submit(self, image: torch.Tensor) -> Future:
        """Queue one preprocessed image ``[3, H, W]``; the future gets ``(scaled logits [C], features [D] or None)``."""
        if self._queue.qsize() >= self.max_queue:
            raise InputError(503, f"server busy: {self.max_queue} images already queued; retry shortly", {"Retry-After": "1"})
        self.start()
        fut: Future = Future()
        self._queue.put((image, fut))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + self.max_wait
            while len(items) < self.batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                items.append(nxt)
            try:
                with self.model_lock:
                    logits, feats = self.predictor.outputs(torch.stack([t for t, _ in items]),
                                                           features=self.predictor.needs_features)
                self.batches += 1
                self.images += len(items)
                logits, feats = logits.cpu(), None if feats is None else feats.cpu()
                for k, (_, fut) in enumerate(items):
                    fut.set_result((logits[k], None if feats is None else feats[k]))
            except Exception as e:  # noqa: BLE001  (a failed batch fails its requests, not the server)
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)


async def read_upload(request, max_bytes: int) -> bytes:
    """The image bytes of a request: a multipart ``file`` field or a raw ``image/*`` body, at most ``max_bytes``."""
    mb = f"{max_bytes / 1024 / 1024:g} MB"
    declared = request.headers.get("content-length")
    limit = max_bytes + 64 * 1024  # multipart framing around the file
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"upload of {int(declared):,} bytes exceeds the {mb} limit (--max-upload-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InputError(413, f"upload exceeds the {mb} limit (--max-upload-mb)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/"):
        data = bytes(body)
    elif ctype == MULTIPART:
        request._body = bytes(body)  # starlette re-reads the cached body when parsing the form
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001
            raise InputError(400, f"malformed multipart form: {e}") from e
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InputError(422, "the form has no file field named 'file' (curl -F file=@bird.jpg ...)")
        part_type = (upload.content_type or "").split(";")[0].strip().lower()
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise InputError(415, f"file content type {part_type!r} is not an image type (image/jpeg, image/png, ...)")
        data = await upload.read()
    else:
        raise InputError(415, f"content type {ctype or 'none'!r} is not accepted: send multipart/form-data with a "
                              "'file' field, or the raw image with an image/* content type")
    if len(data) > max_bytes:
        raise InputError(413, f"image of {len(data):,} bytes exceeds the {mb} limit (--max-upload-mb)")
    return data


def _decode_side(preprocessing: dict) -> int:
    """The shorter side the eval transform resizes to: no JPEG needs decoding larger than this."""
    return math.ceil(int(preprocessing["img_size"]) / float(preprocessing.get("crop_pct") or 1.0))


def check_topk(topk: int | None, default: int, num_classes: int) -> int:
    """The ``?topk=`` of a request (``default`` when absent, capped at the class count), or a 422."""
    k = topk if topk is not None else min(default, num_classes)
    if not 1 <= k <= num_classes:
        raise InputError(422, f"topk must be between 1 and {num_classes}, got {k}")
    return k


def create_app(model: Predictor | str | Path, *, max_upload_mb: float = 10.0, max_pixels: int = 40_000_000, topk: int = 5,
               batch_size: int = 16, max_wait_ms: float = 5.0, device: str = "auto", max_inflight: int = 64,
               decode_slots: int = 4, answering: Answering | None = None, detector: Any = None,
               detect_options: dict[str, Any] | None = None):
    """Build the FastAPI app.

    Args:
        model: a :class:`Predictor`, or a checkpoint file / run folder to load one from.
        max_upload_mb: largest accepted upload (413 above it).
        max_pixels: largest accepted image area in pixels (413 above it; stops decompression bombs).
        topk: default number of classes returned (``?topk=`` overrides it per request).
        batch_size: largest micro-batch.
        max_wait_ms: how long the first request of a batch waits for others.
        device: device when ``model`` (or ``detector``) is a path.
        max_inflight: requests handled at once; more get 503 with ``Retry-After`` (see :mod:`.limits`).
        decode_slots: images decoded at once (each holds its decoded pixels).
        answering: open-set rejection and hierarchical roll-up (``"unknown"``, ``"rollup"`` in the answers).
        detector: a detector checkpoint (or a ready :class:`~finegrain.detect.pipeline.DetectThenClassify`): adds
            ``POST /detect``, whose objects ``model`` classifies, and the page draws their boxes.
        detect_options: ``margin``, ``score_threshold``, ``max_objects``, ``tile``, ``tile_overlap`` of the detector.
    """
    _require_fastapi()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    if max_upload_mb <= 0 or max_pixels <= 0 or batch_size < 1 or topk < 1:
        raise ValueError(f"--max-upload-mb ({max_upload_mb}), --max-pixels ({max_pixels}), --batch-size ({batch_size}) "
                         f"and --topk ({topk}) must be positive")
    gate = RequestGate(max_inflight=max_inflight, decode_slots=decode_slots)
    predictor = model if isinstance(model, Predictor) else Predictor.from_checkpoint(model, device=device, answering=answering)
    if answering is not None and isinstance(model, Predictor):
        predictor.answering = predictor._check_answering(answering)
    batcher = MicroBatcher(predictor, batch_size=batch_size, max_wait_ms=max_wait_ms)
    pipeline = None
    if detector is not None:
        from finegrain.serve.detect import add_detect_route, describe, load_pipeline

        pipeline = load_pipeline(detector, predictor, device=device, options=detect_options)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="finegrain", summary="Fine-grained image classification", lifespan=lifespan)
    app.state.predictor, app.state.batcher, app.state.gate = predictor, batcher, gate

    @app.exception_handler(InputError)
    async def _input_error(request, exc: InputError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Busy)
    async def _busy(request, exc: Busy):
        return JSONResponse({"detail": exc.detail}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    limits = {"gate": gate, "max_bytes": int(max_upload_mb * 1024 * 1024), "max_pixels": max_pixels}
    _add_predict_route(app, predictor, batcher, default_topk=topk, **limits)
    _add_explain_route(app, predictor, batcher, **limits)
    if pipeline is not None:
        add_detect_route(app, pipeline, model_lock=batcher.model_lock, default_topk=topk, **limits)
    _add_info_routes(app, predictor, batcher, gate, detector=None if pipeline is None else describe(pipeline),
                     limits={"max_upload_mb": max_upload_mb, "max_pixels": max_pixels})
    return app


def _add_predict_route(app, predictor: Predictor, batcher: MicroBatcher, *, gate: RequestGate, max_bytes: int, max_pixels: int,
                       default_topk: int) -> None:
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool

    side = _decode_side(predictor.meta["preprocessing"])

    def _preprocess(data: bytes):
        image = decode_image(data, max_pixels=max_pixels, min_side=side)
        return predictor.transform(image), image.info["original_size"]

    @app.post("/predict")
    async def predict(request: Request, topk: int | None = None) -> dict[str, Any]:
        """Top-k classes of one image (multipart field ``file``, or a raw ``image/*`` body)."""
        k = check_topk(topk, default_topk, len(predictor.classes))
        start = time.perf_counter()
        async with gate.admit():
            data = await read_upload(request, max_bytes)
            async with gate.decoding():
                tensor, size = await run_in_threadpool(_preprocess, data)
            del data
            logits, feats = await asyncio.wrap_future(batcher.submit(tensor))
        (row,) = predictor.answer(logits[None], None if feats is None else feats[None], k)
        return {**row, "image_size": list(size), "elapsed_ms": round(1000 * (time.perf_counter() - start), 2)}


def _add_explain_route(app, predictor: Predictor, batcher: MicroBatcher, *, gate: RequestGate, max_bytes: int,
                       max_pixels: int) -> None:
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool

    side = _decode_side(predictor.meta["preprocessing"])

    def _heatmap(data: bytes) -> dict[str, Any]:
        import base64

        from finegrain.explain.cam import default_method, display_crop, explain, overlay

        image = decode_image(data, max_pixels=max_pixels, min_side=side)
        method = default_method(predictor.task.model)
        with batcher.model_lock:  # Grad-CAM needs the model to itself (gradients through the head)
            (heat, cls), = explain(predictor, [image], method=method)
        buf = io.BytesIO()
        overlay(display_crop(image, predictor.meta["preprocessing"]), heat).save(buf, "PNG")
        return {"class": predictor.classes[cls], "index": cls, "method": method,
                "heatmap": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}

    @app.post("/explain")
    async def explain_route(request: Request) -> dict[str, Any]:
        """Grad-CAM (attention rollout for ViTs) of the predicted class over the eval crop, as a PNG data URL (``heatmap``)."""
        start = time.perf_counter()
        async with gate.admit():
            data = await read_upload(request, max_bytes)
            try:
                async with gate.decoding():
                    out = await run_in_threadpool(_heatmap, data)
            except ValueError as e:  # a model the method cannot explain
                raise InputError(422, f"cannot explain this model: {e}") from e
        return {**out, "elapsed_ms": round(1000 * (time.perf_counter() - start), 2)}


def _add_info_routes(app, predictor: Predictor, batcher: MicroBatcher, gate: RequestGate, *, detector: dict | None,
                     limits: dict[str, Any]) -> None:
    """``GET /labels``, ``GET /health`` and the page at ``/``."""
    from fastapi.responses import HTMLResponse

    classes, meta = predictor.classes, predictor.meta
    info = {"backbone": meta.get("model", {}).get("backbone"), "task": meta.get("task"), "num_classes": len(classes),
            "img_size": meta["preprocessing"]["img_size"], "calibrated": predictor.temperature != 1.0,
            "reject": predictor.answering.reject, "rollup": predictor.answering.rollup, "detector": detector}

    @app.get("/labels")
    def labels() -> dict[str, Any]:
        """Class names in output order."""
        return {"classes": classes, "num_classes": len(classes)}

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness plus model description and batching counters."""
        return {"status": "ok", **info, "batches": batcher.batches, "images": batcher.images, "limits": limits, "load": gate.stats()}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE


# The web page is inline so that it ships inside the wheel without package-data configuration.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>finegrain</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { margin-bottom: .25rem; }
 #model { color: #666; margin-top: 0; }
 #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.5rem; text-align: center; cursor: pointer; }
 #drop.over { background: #eef; }
 #result { display: flex; flex-wrap: wrap; gap: 1rem; margin-top: 1rem; }
 figure { margin: 0; flex: 1 1 14rem; }
 figure img { display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: contain; background: #f4f4f4;
              border-radius: 4px; }
 figcaption { font-size: .85rem; color: #555; margin-top: .25rem; }
 #out { flex: 1 1 100%; }
 table { border-collapse: collapse; width: 100%; }
 td { padding: .3rem .5rem; border-bottom: 1px solid #ddd; }
 td.score { text-align: right; width: 4.5rem; font-variant-numeric: tabular-nums; }
 td.barcell { width: 40%; }
 .bar { background: #4a7; height: .8rem; border-radius: 2px; min-width: 1px; }
 .err { color: #b00; }
 #answer { font-weight: 600; }
 #detect-fig { flex: 1 1 100%; }
 #boxes { display: block; max-width: 100%; height: auto; background: #f4f4f4; border-radius: 4px; }
 td.swatch { width: .8rem; }
 caption { text-align: left; font-weight: 600; padding: .6rem 0 .2rem; }
 td.swatch span { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; }
</style></head>
<body>
<h1>finegrain</h1>
<p id="model"></p>
<div id="drop">Drop an image here, or click to choose one.<input id="file" type="file" accept="image/*" hidden></div>
<div id="result">
 <figure id="preview-fig" hidden><img id="preview" alt="uploaded image"><figcaption>your image</figcaption></figure>
 <figure id="heatmap-fig" hidden><img id="heatmap" alt="Grad-CAM heatmap"><figcaption id="heatmap-caption"></figcaption></figure>
 <figure id="detect-fig" hidden><canvas id="boxes" aria-label="detected objects with their classes"></canvas>
  <figcaption id="detect-caption"></figcaption></figure>
 <div id="out" aria-live="polite"></div>
</div>
<script>
const $ = id => document.getElementById(id);
const drop = $("drop"), file = $("file"), out = $("out");
let detector = null;  // GET /health's "detector": set when served with --detector (POST /detect)
fetch("health").then(r => r.json()).then(h => {
  detector = h.detector;
  $("model").textContent = `${h.backbone} (${h.task}), ${h.num_classes} classes, ${h.img_size} px` +
    (detector ? `; detector of ${detector.classes.join(", ")}` : ""); });
drop.onclick = () => file.click();
file.onchange = () => file.files[0] && send(file.files[0]);
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over"); e.dataTransfer.files[0] && send(e.dataTransfer.files[0]); };
function error(status, j) {
  const p = document.createElement("p"); p.className = "err";
  p.textContent = `Error ${status}: ${typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)}`;
  return p;
}
function answerText(j) {  // "unknown" or "<level> X, <class> uncertain"; empty for a plain answer
  if (j.unknown) return `unknown: ${j.openset.score} ${j.openset.value.toFixed(3)} is below the threshold ${j.openset.threshold.toFixed(3)}`;
  if (j.rollup && j.rollup.level > 0)
    return `${j.rollup.level_name} ${j.rollup.name} (${(100 * j.rollup.score).toFixed(1)}%), class uncertain`;
  return "";
}
async function post(route, f) {
  const body = new FormData(); body.append("file", f);
  const r = await fetch(route, { method: "POST", body });
  return [r, await r.json()];
}
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
function drawBoxes(img, j) {  // the image at its own pixel size (the boxes' coordinates); CSS scales the canvas down
  const c = $("boxes"), ctx = c.getContext("2d");
  c.width = j.width; c.height = j.height;
  if (img) ctx.drawImage(img, 0, 0, j.width, j.height);
  else { ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, j.width, j.height); }  // a format the server reads but the browser cannot show
  const fs = Math.max(12, Math.round(j.width / 45));
  ctx.lineWidth = Math.max(2, j.width / 300); ctx.font = `${fs}px system-ui, sans-serif`; ctx.textBaseline = "top";
  j.objects.forEach((o, i) => {
    const [x0, y0, x1, y1] = o.box, color = COLORS[i % COLORS.length];
    const label = `${i + 1} ${o.class} ${(100 * o.prob).toFixed(0)}%`;
    ctx.strokeStyle = color; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const ty = y0 >= fs + 4 ? y0 - fs - 4 : y0;  // above the box, or inside it at the image's top edge
    const lw = ctx.measureText(label).width + 8, lx = Math.max(0, Math.min(x0, j.width - lw));  // kept on the canvas
    ctx.fillStyle = color; ctx.fillRect(lx, ty, lw, fs + 4);
    ctx.fillStyle = "#fff"; ctx.fillText(label, lx + 4, ty + 2);
  });
}
function objectTable(j) {
  const t = document.createElement("table"); t.id = "objects";
  t.createCaption().textContent = "Detected objects: class, probability, next classes, detector label and score";
  j.objects.forEach((o, i) => {
    const row = t.insertRow();
    const sw = row.insertCell(); sw.className = "swatch";
    const dot = document.createElement("span"); dot.style.background = COLORS[i % COLORS.length]; sw.appendChild(dot);
    row.insertCell().textContent = `${i + 1}. ${o.class}`;
    const s = row.insertCell(); s.className = "score"; s.textContent = (100 * o.prob).toFixed(1) + "%";
    row.insertCell().textContent = o.topk.slice(1).map(c => `${c.class} ${(100 * c.prob).toFixed(1)}%`).join(", ");
    row.insertCell().textContent = `${o.detector_label} ${o.score.toFixed(2)}`;
  });
  return t;
}
async function detect(f) {
  const [r, j] = await post("detect", f);
  if (!r.ok) { out.appendChild(error(r.status, j)); return; }
  const img = $("preview");
  drawBoxes(await img.decode().then(() => img, () => null), j);
  $("detect-caption").textContent = j.objects.length
    ? `${j.objects.length} object${j.objects.length > 1 ? "s" : ""} detected (detector score >= ${detector.score_threshold}), ` +
      "each cropped and classified"
    : `no objects detected (detector score >= ${detector.score_threshold})`;
  $("detect-fig").hidden = false;
  if (j.objects.length) out.appendChild(objectTable(j));
}
async function send(f) {
  $("preview").src = URL.createObjectURL(f); $("preview-fig").hidden = false;
  $("heatmap-fig").hidden = true; $("heatmap").removeAttribute("src"); $("detect-fig").hidden = true;
  out.textContent = "classifying...";
  const [r, j] = await post("predict", f);
  out.innerHTML = "";
  if (!r.ok) { out.appendChild(error(r.status, j)); return; }
  const verdict = answerText(j);
  if (verdict) { const p = document.createElement("p"); p.id = "answer"; p.textContent = verdict; out.appendChild(p); }
  const t = document.createElement("table"); t.id = "topk";
  if (detector) t.createCaption().textContent = "Whole image";
  for (const c of j.topk) {
    const row = t.insertRow();
    row.insertCell().textContent = c.class;
    const s = row.insertCell(); s.className = "score"; s.textContent = (100 * c.score).toFixed(1) + "%";
    const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (100 * c.score) + "%";
    const b = row.insertCell(); b.className = "barcell"; b.appendChild(bar);
  }
  out.appendChild(t);
  if (detector) await detect(f);
  const [e, h] = await post("explain", f);
  if (!e.ok) { out.appendChild(error(e.status, h)); return; }
  $("heatmap").src = h.heatmap;
  $("heatmap-caption").textContent = `Grad-CAM: where the model looks for "${h.class}"`;
  $("heatmap-fig").hidden = false;
}
</script>
</body></html>
"""

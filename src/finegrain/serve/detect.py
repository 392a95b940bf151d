"""``POST /detect``: detect-then-classify on an uploaded image (``finegrain serve CLASSIFIER --detector DETECTOR``).

The route answers what :meth:`DetectThenClassify.predict` answers for one image: its upright size
and every object with its box, detector score, fine-grained class and top-k. The image is decoded
at full resolution (boxes are in its pixels; the pixel cap still applies), and the models run
under the app's model lock, so detection never overlaps the micro-batcher's classifier batches.
"""


import threading
import time
from pathlib import Path
from typing import Any

from finegrain.detect.pipeline import DetectThenClassify
from finegrain.predict import Predictor
from finegrain.serve.app import check_topk, decode_image, read_upload
from finegrain.serve.limits import RequestGate


def load_pipeline(detector: str | Path | DetectThenClassify, predictor: Predictor, *, device: str = "auto",
                  options: dict[str, Any] | None = None) -> DetectThenClassify:
    """``detector`` as a :class:`DetectThenClassify` that classifies with the served ``predictor``.

    Args:
        detector: a detector checkpoint file or run folder, or a ready pipeline (``options`` must then be empty).
        predictor: the app's classifier.
        device: where the detector runs when loaded from a checkpoint.
        options: ``margin``, ``score_threshold``, ``max_objects``, ``tile``, ``tile_overlap``.
    """
    if isinstance(detector, DetectThenClassify):
        if options:
            raise ValueError(f"detect options {sorted(options)} apply to a detector checkpoint, not to a ready DetectThenClassify")
        return detector
    return DetectThenClassify.from_checkpoints(detector, predictor, device=device, **(options or {}))


def describe(pipeline: DetectThenClassify) -> dict[str, Any]:
    """The detector part of ``GET /health``."""
    return {"classes": pipeline.detector_classes, "score_threshold": pipeline.score_threshold, "margin": pipeline.margin,
            "max_objects": pipeline.max_objects, "tile": pipeline.tile}


def add_detect_route(app, pipeline: DetectThenClassify, *, gate: RequestGate, model_lock: threading.Lock, max_bytes: int,
                     max_pixels: int, default_topk: int) -> None:
    """Add ``POST /detect`` to ``app`` (multipart field ``file`` or a raw ``image/*`` body; ``?topk=``)."""
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool

    num_classes = len(pipeline.classifier.classes)

    def _run(data: bytes, k: int) -> dict[str, Any]:
        image = decode_image(data, max_pixels=max_pixels)
        with model_lock:
            (out,) = pipeline.predict([image], topk=k)
        return out

    @app.post("/detect")
    async def detect(request: Request, topk: int | None = None) -> dict[str, Any]:
        """Every detected object with its box (xyxy pixels of the upright image), detector score, class and top-k."""
        k = check_topk(topk, default_topk, num_classes)
        start = time.perf_counter()
        async with gate.admit():
            data = await read_upload(request, max_bytes)
            async with gate.decoding():  # a full-resolution image is held until its objects are classified
                out = await run_in_threadpool(_run, data, k)
        out.pop("image", None)
        return {**out, "elapsed_ms": round(1000 * (time.perf_counter() - start), 2)}

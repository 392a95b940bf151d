"""``finegrain serve``."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (FastAPI: POST /predict, GET /labels, /health, /; "
                                     "with --detector, POST /detect)")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--topk", type=int, default=5, help="classes returned by default (?topk= overrides)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (413 above)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image area (413 above)")
    p.add_argument("--batch-size", type=int, default=16, help="largest micro-batch of concurrent requests")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-inflight", type=int, default=64,
                   help="requests handled at once; more get 503 with Retry-After (bounds memory under load)")
    p.add_argument("--decode-slots", type=int, default=4, help="images decoded at the same time")
    from finegrain.cli import add_answering_flags

    add_answering_flags(p)
    d = p.add_argument_group("detect, then classify (POST /detect and boxes on the page)")
    d.add_argument("--detector", default=None, help="detector checkpoint file or run folder; its objects are classified by CHECKPOINT")
    d.add_argument("--margin", type=float, default=0.1, help="fraction of a box's width and height added on each side before cropping")
    d.add_argument("--score-threshold", type=float, default=0.5, help="drop detections scoring below it")
    d.add_argument("--max-objects", type=int, default=100, help="the most objects per image (the highest-scoring)")
    d.add_argument("--tile", type=int, default=None, help="detect in windows of at most N pixels a side (large images)")
    d.add_argument("--tile-overlap", type=int, default=128, help="least overlap of neighbouring windows in pixels")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from finegrain.cli import answering_from
    from finegrain.serve.app import create_app

    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"serving needs the 'serve' extra: pip install 'finegrain[serve]' ({e})") from e
    app = create_app(args.checkpoint, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, topk=args.topk,
                     batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, device=args.device,
                     max_inflight=args.max_inflight, decode_slots=args.decode_slots, answering=answering_from(args),
                     detector=args.detector, detect_options=_detect_options(args) if args.detector else None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _detect_options(args) -> dict:
    return {"margin": args.margin, "score_threshold": args.score_threshold, "max_objects": args.max_objects, "tile": args.tile,
            "tile_overlap": args.tile_overlap}

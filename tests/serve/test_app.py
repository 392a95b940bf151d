"""The REST app through FastAPI's TestClient (no sockets): every route and every bad input."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from finegrain.cli import main  # noqa: E402
from finegrain.predict import Predictor  # noqa: E402
from finegrain.serve import InputError, create_app, decode_image  # noqa: E402

from ..helpers import CLASSES, make_checkpoint  # noqa: E402


def jpeg(size=(48, 40), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve") / "m.safetensors")
    return Predictor.from_checkpoint(ckpt, device="cpu")


@pytest.fixture(scope="module")
def client(predictor):
    app = create_app(predictor, max_upload_mb=0.05, max_pixels=2_000_000, topk=2, batch_size=8, max_wait_ms=30)
    with TestClient(app) as c:
        yield c


def test_health_labels_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["backbone"] == "test_resnet" and h["num_classes"] == 3
    assert client.get("/labels").json() == {"classes": CLASSES, "num_classes": 3}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Drop an image" in page.text and 'post("predict"' in page.text and 'post("explain"' in page.text


def test_explain_returns_a_gradcam_png_of_the_predicted_class(client, predictor):
    import base64

    data = jpeg((64, 48))
    r = client.post("/explain", files={"file": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["method"] == "gradcam" and j["heatmap"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(j["heatmap"].split(",", 1)[1])))
    assert png.size == (32, 32)  # the eval crop
    ref = predictor.predict([Image.open(io.BytesIO(data))], topk=1)[0]["topk"][0]
    assert j["index"] == ref["index"] and j["class"] == ref["class"]
    r = client.post("/explain", files={"file": ("a.txt", b"nope", "image/jpeg")})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]


def test_predict_multipart_matches_predictor(client, predictor):
    data = jpeg()
    r = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    top = r.json()["topk"]
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"] and top[0]["class"] in CLASSES
    ref = predictor.predict([Image.open(io.BytesIO(data))], topk=2)[0]["topk"]
    assert [t["index"] for t in top] == [t["index"] for t in ref]
    assert abs(top[0]["score"] - ref[0]["score"]) < 1e-5
    r = client.post("/predict?topk=3", files={"file": ("a.jpg", data, "image/jpeg")})
    assert len(r.json()["topk"]) == 3 and abs(sum(t["score"] for t in r.json()["topk"]) - 1) < 1e-4


def test_predict_raw_body_and_png(client):
    buf = io.BytesIO()
    Image.new("RGBA", (30, 30), (0, 0, 255, 128)).save(buf, "PNG")
    r = client.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["image_size"] == [30, 30]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")  # 100 megapixels, a few kB on the wire
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, kwargs, status, words",
    [
        ("not an image", dict(files={"file": ("a.jpg", b"hello, not an image", "image/jpeg")}), 422, "not a readable image"),
        ("truncated jpeg", dict(files={"file": ("a.jpg", jpeg((64, 64))[:400], "image/jpeg")}), 422, "truncated"),
        ("empty file", dict(files={"file": ("a.jpg", b"", "image/jpeg")}), 422, "empty"),
        ("100 megapixels", dict(files={"file": ("bomb.png", _bomb_png(), "image/png")}), 413, "--max-pixels"),
        ("text part", dict(files={"file": ("a.txt", b"hi", "text/plain")}), 415, "not an image type"),
        ("json body", dict(json={"image": "a.jpg"}), 415, "multipart/form-data"),
        ("oversized upload", dict(files={"file": ("big.jpg", b"\xff" * 200_000, "image/jpeg")}), 413, "--max-upload-mb"),
        ("no file field", dict(files={"image": ("a.jpg", jpeg(), "image/jpeg")}), 422, "'file'"),
        ("topk too large", dict(files={"file": ("a.jpg", jpeg(), "image/jpeg")}, params={"topk": 9}), 422, "topk"),
        ("topk not a number", dict(files={"file": ("a.jpg", jpeg(), "image/jpeg")}, params={"topk": "x"}), 422, "topk"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_up(client, name, kwargs, status, words):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert words in str(r.json()["detail"]), r.text
    assert client.get("/health").status_code == 200
    assert client.post("/predict", files={"file": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200


def test_oversized_content_length_is_refused_before_reading(client):
    r = client.post("/predict", content=b"\0" * 100_000, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]


def test_concurrent_requests_are_batched_and_correct(client, predictor):
    colors = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (250, 250, 0)] * 4
    payloads = [jpeg(color=c) for c in colors]
    expected = [r["topk"][0]["index"] for r in predictor.predict([Image.open(io.BytesIO(p)) for p in payloads], topk=1)]
    before = client.get("/health").json()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: client.post("/predict", files={"file": ("a.jpg", p, "image/jpeg")}), payloads))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["topk"][0]["index"] for r in responses] == expected
    after = client.get("/health").json()
    assert after["images"] - before["images"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a batch


def test_inference_failure_is_a_500_not_a_crash(predictor):
    app = create_app(predictor, batch_size=2, max_wait_ms=1)
    original = app.state.batcher.predictor
    with TestClient(app, raise_server_exceptions=False) as c:

        class Broken:
            def logits(self, x):
                raise RuntimeError("boom")

        app.state.batcher.predictor = Broken()
        assert c.post("/predict", files={"file": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 500
        app.state.batcher.predictor = original
        assert c.post("/predict", files={"file": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200


def test_decode_image_checks_pixels_before_decoding():
    with pytest.raises(InputError) as e:
        decode_image(jpeg((100, 100)), max_pixels=5_000)
    assert e.value.status == 413
    assert decode_image(jpeg((10, 20)), max_pixels=5_000).size == (10, 20)


def test_create_app_from_checkpoint_and_bad_limits(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    with TestClient(create_app(ckpt, device="cpu")) as c:
        assert c.get("/labels").json()["classes"] == CLASSES
    with pytest.raises(ValueError, match="--max-upload-mb"):
        create_app(ckpt, max_upload_mb=0)


def test_serve_cli_passes_flags_to_uvicorn(tmp_path, monkeypatch):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    assert main(["serve", str(ckpt), "--port", "8123", "--max-upload-mb", "2", "--max-pixels", "1000000", "--device", "cpu"]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8123
    with TestClient(calls["app"]) as c:
        assert c.get("/health").json()["limits"] == {"max_upload_mb": 2.0, "max_pixels": 1_000_000}
        assert c.get("/health").json()["load"]["max_inflight"] == 64


def test_a_large_jpeg_is_decoded_reduced_to_near_the_model_size():
    """Pillow's draft decodes a 1600x1200 JPEG at 1/4 scale for a 224 px model (short side >= 256), and the
    reduced decode gives the same class scores as the full one to within the JPEG's own noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    full = decode_image(buf.getvalue(), max_pixels=10_000_000)
    small = decode_image(buf.getvalue(), max_pixels=10_000_000, min_side=256)
    assert full.size == (1600, 1200) and small.size == (400, 300)
    assert small.info["original_size"] == (1600, 1200)
    a = np.asarray(full.resize((400, 300), Image.BOX), dtype=np.float32)
    b = np.asarray(small, dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0  # the same picture, reduced in the DCT instead of after decoding


def test_past_max_inflight_the_server_answers_503_with_retry_after(predictor):
    app = create_app(predictor, max_inflight=2)
    with TestClient(app) as c:
        assert c.post("/predict", content=jpeg(), headers={"content-type": "image/jpeg"}).status_code == 200
        app.state.gate.inflight = 2  # two requests are in progress
        r = c.post("/predict", content=jpeg(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-inflight" in r.json()["detail"]
        assert c.get("/health").json()["load"]["refused"] == 1
        app.state.gate.inflight = 0
        assert c.post("/predict", content=jpeg(), headers={"content-type": "image/jpeg"}).status_code == 200


def test_the_gate_limits_concurrent_decodes_and_frees_its_places():
    import asyncio

    from finegrain.serve.limits import Busy, RequestGate

    gate = RequestGate(max_inflight=3, decode_slots=2, trim_interval_s=0.0)
    peak = {"now": 0, "max": 0}

    async def one():
        async with gate.admit(), gate.decoding():
            peak["now"] += 1
            peak["max"] = max(peak["max"], peak["now"])
            await asyncio.sleep(0.01)
            peak["now"] -= 1

    async def burst():
        results = await asyncio.gather(*(one() for _ in range(5)), return_exceptions=True)
        return [type(r).__name__ for r in results]

    outcome = asyncio.run(burst())
    assert outcome.count("Busy") == 2 and outcome.count("NoneType") == 3  # 3 admitted, 2 refused
    assert peak["max"] == 2 and gate.inflight == 0
    assert issubclass(Busy, Exception)
    with pytest.raises(ValueError, match="--decode-slots"):
        RequestGate(decode_slots=0)

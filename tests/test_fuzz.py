"""Hostile inputs through train, eval, predict and the server's /predict: each ends in exit 0 or 2 (or a 2xx/4xx)
with a message, never a traceback, a hang or a 5xx.

The inputs: truncated, zero-byte, wrong-extension and huge-dimension images, CMYK, 16-bit, palette and EXIF-rotated
ones, a file name that is not UTF-8, a broken symlink; malformed CSV and CUB tables; truncated and tampered
checkpoints. Readable oddities (CMYK, 16-bit, palette, EXIF) must be read; the rest must be skipped and listed.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.cli import main

from .conftest import make_image_folder
from .helpers import make_checkpoint, make_cub


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(mode: str = "RGB", size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return _save(_photo(), "JPEG", exif=exif.tobytes())


def _bomb() -> bytes:
    return _save(Image.new("1", (20_000, 20_000)), "PNG")  # 400 megapixels in a few kB


READABLE = {  # odd but valid: must be read
    "cmyk.jpg": lambda: _save(_photo("CMYK"), "JPEG"),
    "sixteen_bit.png": lambda: _save(Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)), "PNG"),
    "palette.png": lambda: _save(_photo("P"), "PNG", transparency=0),
    "exif_rotated.jpg": _exif_rotated,
    "png_named.jpg": lambda: _save(_photo(), "PNG"),
}
UNREADABLE = {  # must be skipped and listed, never crash
    "truncated.jpg": lambda: _save(_photo(size=(64, 64)), "JPEG")[:300],
    "zero_byte.jpg": lambda: b"",
    "text_named.jpg": lambda: b"this is not an image\n",
    "huge_dimensions.png": _bomb,
}


def plant_images(folder: Path) -> dict[str, Path]:
    """Write every hostile image into ``folder``; return name -> path (non-UTF-8 name and broken link included)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, make in {**READABLE, **UNREADABLE}.items():
        out[name] = folder / name
        out[name].write_bytes(make())
    raw = os.path.join(os.fsencode(folder), b"bird_\xff\xfe.jpg")  # not valid UTF-8
    with open(raw, "wb") as f:
        f.write(_save(_photo(), "JPEG"))
    out["non_utf8_name"] = Path(os.fsdecode(raw))
    out["broken_link.jpg"] = folder / "broken_link.jpg"
    os.symlink(folder / "does_not_exist.jpg", out["broken_link.jpg"])
    return out


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory):
    """A class-folder data set whose train and test splits both hold every hostile image, and a model trained on it."""
    root = tmp_path_factory.mktemp("fuzz")
    data = make_image_folder(root / "data", n_train=6, n_test=2)
    planted = {split: plant_images(data / split / "red") for split in ("train", "test")}
    return root, data, planted


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert "Traceback" not in err, err
    return rc, " ".join(err.split())


def test_train_and_eval_read_the_odd_images_and_list_the_broken_ones(hostile_data, capsys, tmp_path):
    root, data, planted = hostile_data
    rc, err = _run(["train", "--data", data, "--backbone", "test_resnet", "--pretrained", "none", "--epochs", "1",
                    "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--val-fraction", "0.3",
                    "--out", tmp_path / "runs", "--name", "fuzz"], capsys)
    assert rc == 0, err
    run = tmp_path / "runs" / "fuzz"
    listed = {line.split("\t")[0] for line in (run / "skipped_images.txt").read_text(errors="replace").splitlines()}
    bad = {str(planted["train"][n].absolute()) for n in [*UNREADABLE, "broken_link.jpg"]}
    good = {str(planted["train"][n].resolve()) for n in READABLE}
    assert {os.path.basename(p) for p in listed} == {os.path.basename(p) for p in bad}, listed
    assert not good & listed
    rc, err = _run(["eval", run, "--data", data, "--workers", "0", "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {os.path.basename(p) for p in results["skipped"]} == {os.path.basename(p) for p in bad}
    n_test = 3 * 2 + len(READABLE) + 1  # the good images, the readable oddities and the non-UTF-8 name
    assert results["n"] == n_test


@pytest.mark.parametrize("name", [*READABLE, *UNREADABLE, "non_utf8_name", "broken_link.jpg"])
def test_predict_on_each_hostile_file(name, hostile_data, capsys, tmp_path):
    _, _, planted = hostile_data
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    rc, err = _run(["predict", ckpt, planted["test"][name], "--device", "cpu", "--format", "json"], capsys)
    if name in READABLE or name == "non_utf8_name":
        assert rc == 0, err
    else:
        assert rc == 2 and "could not be read" in err, err


def test_the_server_answers_each_hostile_upload_with_2xx_or_4xx(hostile_data, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from finegrain.serve import create_app

    _, _, planted = hostile_data
    with TestClient(create_app(make_checkpoint(tmp_path / "m.safetensors"), device="cpu", max_pixels=50_000_000)) as c:
        for name, make in {**READABLE, **UNREADABLE}.items():
            r = c.post("/predict", content=make(), headers={"content-type": "image/jpeg"})
            expected = 200 if name in READABLE else (413, 422)
            assert r.status_code in (expected if isinstance(expected, tuple) else (expected,)), (name, r.status_code, r.text)
            assert r.status_code == 200 or len(r.json()["detail"]) > 20
        assert c.get("/health").json()["status"] == "ok"


def _csv(tmp, text: str | bytes) -> Path:
    p = tmp / "data.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _cub(tmp, edit) -> Path:
    base = make_cub(tmp)
    edit(base)
    return base


TABLES = {
    "csv without header": lambda t: _csv(t, "a.jpg,red\nb.jpg,blue\n"),
    "csv with a missing label": lambda t: _csv(t, "path,label\na.jpg,\n"),
    "csv ragged rows": lambda t: _csv(t, "path,label\na.jpg\nb.jpg,red,extra,cols\n"),
    "csv bad split value": lambda t: _csv(t, "path,label,split\na.jpg,red,validation\n"),
    "csv not utf-8": lambda t: _csv(t, b"path,label\n\xff\xfe.jpg,r\xe9d\n"),
    "csv empty file": lambda t: _csv(t, ""),
    "cub images.txt with words for ids": lambda t: _cub(t, lambda b: (b / "images.txt").write_text("one two\nx\n")),
    "cub label of an unknown class": lambda t: _cub(t, lambda b: (b / "image_class_labels.txt").write_text(
        (b / "image_class_labels.txt").read_text().replace(" 5\n", " 99\n"))),
    "cub split file truncated": lambda t: _cub(t, lambda b: (b / "train_test_split.txt").write_text("1 1\n")),
    "cub boxes with text": lambda t: _cub(t, lambda b: (b / "bounding_boxes.txt").write_text("1 a b c d\n")),
}


@pytest.mark.parametrize("case", list(TABLES))
def test_a_malformed_table_is_refused_with_a_message(case, tmp_path, capsys):
    data = TABLES[case](tmp_path)
    rc, err = _run(["train", "--data", data, "--backbone", "test_resnet", "--pretrained", "none", "--epochs", "1",
                    "--img-size", "32", "--workers", "0", "--device", "cpu", "--out", tmp_path / "runs"], capsys)
    assert rc == 2 and len(err) > 30, (case, rc, err)
    assert not list(tmp_path.rglob("*.safetensors")), case


def _tamper(ckpt: Path, how: str) -> Path:
    raw = ckpt.read_bytes()
    if how == "truncated":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif how == "header length lies":
        ckpt.write_bytes((10 ** 12).to_bytes(8, "little") + raw[8:])
    elif how == "metadata not json":
        ckpt.write_bytes(raw.replace(b'"finegrain":"{', b'"finegrain":"[', 1))
    elif how == "zero bytes":
        ckpt.write_bytes(b"")
    elif how == "weights flipped":
        ckpt.write_bytes(raw[:-64] + bytes(64))
    return ckpt


@pytest.mark.parametrize("how", ["truncated", "header length lies", "metadata not json", "zero bytes"])
@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_a_truncated_or_tampered_checkpoint_is_refused(how, command, hostile_data, tmp_path, capsys):
    _, data, planted = hostile_data
    ckpt = _tamper(make_checkpoint(tmp_path / "m.safetensors"), how)
    argv = {"predict": ["predict", ckpt, planted["test"]["cmyk.jpg"], "--device", "cpu"],
            "eval": ["eval", ckpt, "--data", data, "--workers", "0", "--device", "cpu"],
            "export": ["export", ckpt, "--out", tmp_path / "m.onnx"]}[command]
    rc, err = _run(argv, capsys)
    assert rc == 2 and str(ckpt) in err, (how, command, err)


def test_a_checkpoint_whose_bytes_changed_still_loads_or_is_refused_clearly(tmp_path, capsys):
    """Flipped weight bytes keep the file well-formed (safetensors has no checksum): it loads and predicts finite
    numbers, or it is refused; it never crashes."""
    ckpt = _tamper(make_checkpoint(tmp_path / "m.safetensors"), "weights flipped")
    img = tmp_path / "a.png"
    img.write_bytes(READABLE["palette.png"]())
    rc, err = _run(["predict", ckpt, img, "--device", "cpu"], capsys)
    assert rc in (0, 2), err


def test_the_hostile_folder_itself_is_left_as_it_was(hostile_data):
    """Reading never rewrites or deletes a user's files."""
    _, data, planted = hostile_data
    for name, make in {**READABLE, **UNREADABLE}.items():
        assert planted["train"][name].read_bytes() == make(), name
    assert os.path.islink(planted["train"]["broken_link.jpg"])

"""finegrain report: one self-contained HTML page from a tiny trained run, parsed and (with Chromium) rendered."""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

SECTIONS = ("summary", "curves", "confusion", "confused-pairs", "per-class", "calibration", "embedding",
            "explanations", "config")


class _Page(HTMLParser):
    """Section ids, <img> sources, and anything that would reach outside the file."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external, self.tables = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        if tag in ("link", "iframe", "object", "embed") or (tag == "script" and "src" in a):
            self.external.append((tag, a))
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v.startswith(("http:", "https:", "//", "file:")):
                self.external.append((tag, a))


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    from finegrain.report import build_report

    result, data = trained_run
    out = tmp_path_factory.mktemp("report") / "report.html"
    return build_report(result.run_dir, out=out, workers=0, device="cpu", n_examples=2, n_pairs=2), result, data


def test_report_has_every_section_and_only_inline_pngs(report):
    path, result, data = report
    page = _parse(path)
    assert page.sections == list(SECTIONS)
    assert not page.external
    # curves, confusion, per-class bars, reliability, t-SNE at least; plus thumbnails and overlays
    assert len(page.images) >= 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.format == "PNG" and img.width > 8 and img.height > 8
    text = path.read_text(encoding="utf-8")
    assert "test split" in text and str(data) in text  # says which split and data it evaluated
    assert "Grad-CAM" in text and "t-SNE" in text and "ECE" in text
    assert page.tables >= 2 and 'class="sortable"' in text


def test_report_default_path_and_val_split(trained_run):
    from finegrain.report import build_report

    result, _ = trained_run
    path = build_report(result.run_dir, split="val", workers=0, device="cpu", n_examples=1, max_points=0)
    assert path == result.run_dir / "report-val.html"
    text = path.read_text(encoding="utf-8")
    assert "validation split" in text and "Too few images" in text
    assert _parse(path).sections == list(SECTIONS)


def test_report_errors(trained_run, tmp_path):
    from finegrain.report import build_report

    result, _ = trained_run
    with pytest.raises(ValueError, match="split must be one of"):
        build_report(result.run_dir, split="holdout")
    with pytest.raises(FileNotFoundError, match="no best.safetensors"):
        build_report(tmp_path)
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (other / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(other / split / name / "x.jpg")
    with pytest.raises(ValueError, match="classes"):
        build_report(result.run_dir, data=other, workers=0, device="cpu")


def test_report_cli(trained_run, tmp_path, capsys):
    from finegrain.cli import main

    result, data = trained_run
    out = tmp_path / "r.html"
    rc = main(["report", str(result.run_dir), "--data", str(data), "--out", str(out), "--workers", "0",
               "--device", "cpu", "--examples", "1", "--pairs", "1"])
    assert rc == 0 and out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium (apt-get install chromium)")
def test_report_renders_in_chromium(report, tmp_path):
    from finegrain.report import screenshot

    path, _, _ = report
    png = screenshot(path, tmp_path / "shot.png", width=1000)
    img = Image.open(png)
    assert img.format == "PNG" and img.width == 1000
    assert 1500 <= img.height <= 16000  # the whole page, not one window
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert arr.std() > 20  # not a blank page
    assert len(np.unique(arr.reshape(-1, 3)[::7], axis=0)) > 200  # figures and photos, not just text


def test_report_on_a_vit_with_task_features(image_folder, tmp_path):
    """Rollout for a ViT; an fgvc task's own ``features`` feed the t-SNE map."""
    from finegrain.report import build_report
    from finegrain.train.run import fit

    from ..conftest import tiny_config

    cfg = tiny_config(image_folder, tmp_path / "runs", epochs=1)
    cfg.model.backbone, cfg.model.task, cfg.model.loss = "test_vit", "fgvc", "ce+center:0.01"
    path = build_report(fit(cfg).run_dir, workers=0, device="cpu", n_examples=1, n_pairs=1)
    text = path.read_text(encoding="utf-8")
    assert "attention rollout overlays" in text and "explanations for this model" not in text
    assert _parse(path).sections == list(SECTIONS)

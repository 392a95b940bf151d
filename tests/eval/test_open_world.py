"""Calibration, open-set scores and class hierarchies: each checked against a known answer or a naive version,
then end to end through train, calibrate, predict, eval, export and serve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finegrain.eval.calibration import calibration_summary, fit_temperature
from finegrain.eval.hierarchy import Taxonomy, hierarchy_metrics, level_accuracy, mistake_severity, rollup
from finegrain.eval.openset import auroc, fpr_at_tpr, knn_score, logit_scores, threshold_at_tpr

# ----------------------------------------------------------------------------------- calibration


def _overconfident(scale: float, n: int = 6000, c: int = 6, seed: int = 0):
    """Labels drawn from softmax(z); the model reports scale * z (overconfident for scale > 1): the best T is scale."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * scale, labels


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_the_fitted_temperature_recovers_the_known_overconfidence(scale):
    logits, labels = _overconfident(scale)
    t = fit_temperature(logits, labels)
    assert abs(t - scale) / scale < 0.08, t
    grid = np.linspace(0.2, 5.0, 481)  # the naive version: NLL on a grid
    nll = [F.cross_entropy(logits / g, labels).item() for g in grid]
    assert F.cross_entropy(logits / t, labels).item() <= min(nll) + 1e-4


def test_temperature_scaling_lowers_ece_and_keeps_the_argmax():
    logits, labels = _overconfident(3.0)
    s = calibration_summary(logits, labels, fit_temperature(logits, labels))
    assert s["ece_after"] < s["ece_before"] / 3 and s["nll_after"] < s["nll_before"]
    assert torch.equal((logits / s["temperature"]).argmax(1), logits.argmax(1))


# ----------------------------------------------------------------------------------- open-set scores


def test_scores_on_hand_computed_logits():
    s = logit_scores(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), temperature=2.0)
    assert torch.allclose(s["energy"], torch.tensor([math.log(2), math.log(math.exp(2) + 1)]))
    assert torch.allclose(s["msp"], torch.tensor([0.5, math.exp(1) / (math.exp(1) + 1)]))
    assert torch.equal(s["max_logit"], torch.tensor([0.0, 2.0]))


def test_knn_score_equals_a_brute_force_search():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(40, 8, generator=g), torch.randn(7, 8, generator=g)
    got = knn_score(queries, bank, k=5, chunk=3)
    for i, q in enumerate(queries):
        d = sorted(float(torch.linalg.norm(F.normalize(q, dim=0) - F.normalize(b, dim=0))) for b in bank)
        assert abs(got[i].item() + d[4]) < 1e-5


def test_auroc_and_fpr_equal_naive_counts():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    known[:10] = unknown[:10]  # ties count half
    naive = np.mean([(k > u) + 0.5 * (k == u) for k in known for u in unknown])
    assert abs(auroc(known, unknown) - naive) < 1e-12
    t = threshold_at_tpr(known, 0.95)
    assert (known >= t).mean() >= 0.95 and (known >= np.nextafter(t, np.inf)).mean() < 0.95
    assert fpr_at_tpr(known, unknown, 0.95) == (unknown >= t).mean()


# ----------------------------------------------------------------------------------- hierarchy

TREE = Taxonomy({"a1": "A", "a2": "A", "b1": "B", "A": "root", "B": "root"}, level_names=["genus", "family"])
LEAVES = ["a1", "a2", "b1"]


@pytest.mark.parametrize("threshold, expected", [(0.3, ("a1", 0)), (0.5, ("A", 1)), (0.8, ("root", 2))])
def test_rollup_answers_the_deepest_confident_node(threshold, expected):
    r = rollup(torch.tensor([0.4, 0.35, 0.25]), LEAVES, TREE, threshold)
    assert (r["name"], r["level"]) == expected
    assert r["level_name"] == ["class", "genus", "family"][expected[1]]


def test_mistake_severity_and_level_accuracy_by_hand():
    assert [mistake_severity(p, 0, LEAVES, TREE) for p in (0, 1, 2)] == [0, 1, 2]
    acc = level_accuracy(pred=[1, 2, 0], true=[0, 0, 0], classes=LEAVES, taxonomy=TREE)
    assert acc == {"class": pytest.approx(100 / 3), "genus": pytest.approx(200 / 3), "family": 100.0}
    m = hierarchy_metrics(torch.tensor([[0.0, 3, 0], [0, 0, 3], [3, 0, 0]]), torch.tensor([0, 0, 0]), LEAVES, TREE,
                          rollup_threshold=0.99)
    assert m["mistake_severity"] == 1.5 and m["rollup"]["answers_by_level"]["family"] == 3


def test_a_taxonomy_from_csv_and_a_cycle(tmp_path):
    p = tmp_path / "parents.csv"
    p.write_text("class,parent\na1,A\na2,A\nA,root\n")
    t = Taxonomy.from_csv(p)
    assert t.ancestors("a1") == ["A", "root"] and t.depth(["a1", "zz"]) == 2
    with pytest.raises(ValueError, match="cycle"):
        Taxonomy({"x": "y", "y": "x"})
    with pytest.raises(ValueError, match="none of the 2 classes"):
        t.check_classes(["p", "q"], "parents.csv")


def test_the_readers_attach_their_taxonomies(tmp_path):
    from finegrain.data import DATASETS
    from finegrain.eval.hierarchy import taxonomy_of

    from ..helpers import NAB_LEAVES, make_aircraft, make_nabirds

    nab = taxonomy_of(DATASETS.get("nabirds")(make_nabirds(tmp_path / "n"), "train"))
    assert nab.ancestors(NAB_LEAVES[295]) == ["Terns", "Birds"]
    make_aircraft(tmp_path / "a")
    air_images = DATASETS.get("aircraft")(tmp_path / "a", "train")
    air = taxonomy_of(air_images)
    assert air.level_names == ["family", "manufacturer"]
    family = DATASETS.get("aircraft")(tmp_path / "a", "train", level="family")
    by_path = dict(zip(family.paths, (family.classes[label] for label in family.labels)))
    for path, label in zip(air_images.paths, air_images.labels):  # each variant's parent is its images' family
        assert air.parents[air_images.classes[label]].removesuffix(" (family)") == by_path[path]
    assert len(set(air.parents.values()) & set(air_images.classes)) == 0  # no inner node named like a class


# ----------------------------------------------------------------------------------- end to end


def test_training_stores_temperature_thresholds_and_bank(trained_run):
    from finegrain.checkpoint import load_extra, read_meta
    from finegrain.eval.openset import BANK_KEY, SCORES

    result, _ = trained_run
    meta = read_meta(result.best_checkpoint)
    assert meta.calibration["temperature"] > 0 and meta.calibration["fitted_on"] == "validation split"
    assert set(meta.openset["thresholds"]) == set(SCORES) and meta.openset["tpr"] == 0.95
    bank = load_extra(result.best_checkpoint, BANK_KEY)
    assert bank.shape[0] == meta.openset["bank_size"] > 0
    assert torch.allclose(bank.float().norm(dim=1), torch.ones(len(bank)), atol=1e-2)


def test_predict_rejects_exactly_below_the_threshold_and_scores_are_calibrated(trained_run):
    from PIL import Image

    from finegrain import Predictor
    from finegrain.predict import Answering

    result, data = trained_run
    plain = Predictor.from_checkpoint(result.best_checkpoint, device="cpu")
    img = Image.open(next((data / "test" / "red").iterdir()))
    x = plain.transform(img)[None]
    raw = plain.task.predict(x).float()
    assert torch.allclose(plain.logits(x), raw / plain.temperature, atol=1e-6)
    msp = (raw / plain.temperature).softmax(1).max().item()
    for threshold, unknown in ((msp - 1e-4, False), (msp + 1e-4, True)):
        p = Predictor.from_checkpoint(result.best_checkpoint, device="cpu", answering=Answering("msp", threshold))
        (r,) = p.predict([img], topk=2)
        assert r["unknown"] is unknown and r["openset"]["value"] == pytest.approx(msp, abs=1e-6)
    with pytest.raises(ValueError, match="hierarchy"):
        Predictor.from_checkpoint(result.best_checkpoint, device="cpu", answering=Answering(rollup=0.5))


def test_eval_with_unknown_images_reports_open_set_metrics(trained_run, tmp_path, capsys):
    from PIL import Image

    from finegrain.cli import main

    result, data = trained_run
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # grey noise: none of the colour classes
        Image.fromarray(rng.integers(100, 156, (40, 40, 3), dtype=np.uint8)).save(unknown / f"{i}.png")
    assert main(["eval", str(result.run_dir), "--data", str(data), "--workers", "0", "--device", "cpu",
                 "--out", str(tmp_path / "e"), "--unknown", str(unknown)]) == 0
    r = json.loads((tmp_path / "e" / "results.json").read_text())
    o = r["openset"]
    assert (o["n_known"], o["n_unknown"]) == (r["n"], 6) and set(o["scores"]) == {"msp", "energy", "max_logit", "knn"}
    for s in o["scores"].values():
        assert 0 <= s["auroc"] <= 1 and 0 <= s["known_accuracy_at_threshold"] <= s["known_accepted"] <= 1
    assert r["calibration"]["temperature"] > 0 and len(r["calibration"]["reliability_after"]["count"]) == 15
    assert (tmp_path / "e" / "reliability_before.png").stat().st_size > 1000 and (tmp_path / "e" / "reliability_after.png").is_file()
    assert "AUROC" in capsys.readouterr().err


def test_calibrate_an_existing_checkpoint_with_a_hierarchy_then_roll_up(trained_run, tmp_path, capsys):
    from finegrain.checkpoint import derive, read_meta
    from finegrain.cli import main

    result, data = trained_run
    tree = tmp_path / "parents.csv"
    tree.write_text("red,warm\ngreen,cool\nblue,cool\nwarm,colour\ncool,colour\n")
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", str(result.run_dir), "--data", str(data), "--hierarchy", str(tree), "--out", str(out),
                 "--workers", "0", "--device", "cpu", "--bank-size", "5", "--k", "3"]) == 0
    meta = read_meta(out)
    assert meta.hierarchy["parents"]["blue"] == "cool" and meta.openset["bank_size"] == 5
    capsys.readouterr()
    img = next((data / "test" / "blue").iterdir())
    assert main(["predict", str(out), str(img), "--format", "json", "--device", "cpu", "--rollup", "1.0"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["rollup"]["level"] >= 1 or r["topk"][0]["score"] == 1.0  # a probability of exactly 1 is rare
    assert main(["eval", str(out), "--data", str(data), "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "e"),
                 "--rollup", "0.9"]) == 0
    h = json.loads((tmp_path / "e" / "results.json").read_text())["hierarchy"]
    assert h["levels"] == ["class", "level 1", "level 2"] and h["level_accuracy"]["level 2"] == 100.0
    derived = derive(meta, "pruned", out)
    assert derived.calibration is None and derived.openset is None and derived.hierarchy == meta.hierarchy


def test_calibrate_on_val_without_the_run_folder_says_what_to_give_instead(trained_run, tmp_path, capsys):
    import shutil

    from finegrain.cli import main

    result, data = trained_run
    shutil.copy(result.best_checkpoint, tmp_path / "best.safetensors")  # no split.json beside it
    assert main(["calibrate", str(tmp_path / "best.safetensors"), "--data", str(data), "--workers", "0", "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "split.json" in err and "--split train with a held-out folder as --data" in err


def test_the_export_divides_by_the_temperature(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from finegrain import Predictor
    from finegrain.deploy import OnnxModel, export_checkpoint

    result, data = trained_run
    export_checkpoint(result.best_checkpoint, tmp_path / "m.onnx", verify_data=data, verify_images=3)
    p = Predictor.from_checkpoint(result.best_checkpoint, device="cpu")
    x = torch.rand(2, 3, 32, 32)
    onnx = OnnxModel(tmp_path / "m.onnx")
    assert float(onnx.metadata["temperature"]) == pytest.approx(p.temperature)
    assert np.allclose(onnx.logits(x), (p.task.predict(x).float() / p.temperature).numpy(), atol=1e-4)


def test_the_server_says_unknown_and_rolls_up(trained_run, tmp_path):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from finegrain.predict import Answering
    from finegrain.serve import create_app

    result, data = trained_run
    buf = io.BytesIO()
    Image.open(next((data / "test" / "red").iterdir())).save(buf, "PNG")
    app = create_app(result.best_checkpoint, device="cpu", answering=Answering(reject="knn", reject_threshold=10.0))
    with TestClient(app) as c:
        r = c.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"}).json()
        assert r["unknown"] is True and r["openset"]["score"] == "knn"  # any distance is below +10
        assert c.get("/health").json()["reject"] == "knn" and "answerText" in c.get("/").text

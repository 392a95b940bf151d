import json

import pytest

from finegrain.cli import main


def test_train_eval_predict_end_to_end(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2", "--lr", "3e-3",
               "--warmup-epochs", "0", "--device", "cpu", "--out", str(out), "--name", "e2e"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    run_dir = out / "e2e"
    assert info["run_dir"] == str(run_dir) and (run_dir / "best.safetensors").is_file()

    rc = main(["eval", str(run_dir), "--data", str(image_folder), "--split", "test", "--tta-flip", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    results = json.loads((run_dir / "eval-test" / "results.json").read_text())
    assert results["n"] == 9 and results["tta"] == "hflip" and results["split"] == "test"
    assert 0 <= results["top1"] <= 100 and len(results["confusion_matrix"]) == 3
    for name in ("per_class.csv", "confusion.csv", "confusion.png"):
        assert (run_dir / "eval-test" / name).stat().st_size > 0
    capsys.readouterr()

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    rc = main(["predict", str(run_dir / "best.safetensors"), str(image_folder / "test" / "red"), str(bad),
               "--topk", "2", "--format", "json", "--device", "cpu"])
    assert rc == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 4
    assert "error" in preds[-1] and "cannot read image" in preds[-1]["error"]
    for p in preds[:3]:
        assert len(p["topk"]) == 2 and p["topk"][0]["class"] in ("red", "green", "blue")
        assert p["topk"][0]["score"] >= p["topk"][1]["score"]

    rc = main(["predict", str(run_dir), str(image_folder / "test" / "blue"), "--format", "csv", "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,rank,class") and len(lines) == 1 + 3 * 3

    rc = main(["predict", str(run_dir), str(image_folder / "test" / "blue"), "--device", "cpu"])  # the table
    out = capsys.readouterr()
    assert rc == 0 and out.out.count("blue_") == 3 and "blue_" not in out.err  # `> preds.txt` keeps the table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/folder"], "does not exist"),
        (["train", "--data", "IMAGES", "--val-fraction", "1.5"], "--val-fraction"),
        (["train", "--data", "IMAGES", "--backbone", "resnet5O", "--pretrained", "none"], "Close matches"),
        (["train", "--data", "IMAGES", "--augment", "heavy"], "--augment"),
        (["eval", "/nonexistent/run", "--data", "IMAGES"], "does not exist"),
    ],
)
def test_bad_input_gets_a_clear_error(argv, message, image_folder, tmp_path, capsys):
    argv = [str(image_folder) if a == "IMAGES" else a for a in argv] + (["--out", str(tmp_path)] if argv[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err.replace("\n", " ")


def test_empty_class_folder_is_named(image_folder, tmp_path, capsys):
    (image_folder / "train" / "yellow").mkdir()
    assert main(["train", "--data", str(image_folder), "--out", str(tmp_path)]) == 2
    assert "yellow" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    ["--task", "fgvc", "--attention", "se", "--pooling", "compact_bilinear", "--pool-dim", "64",
     "--loss", "ce+center:0.01+triplet:1"],
    ["--task", "wsdan", "--wsdan-parts", "4"],
    ["--task", "racnn", "--racnn-scales", "2"],
    ["--task", "parts-weak", "--parts-num", "2", "--parts-pool", "mil"],
])
def test_train_and_predict_through_the_cli(image_folder, tmp_path, capsys, extra):
    from finegrain.cli import main
    from finegrain.predict import Predictor

    out = tmp_path / "runs"
    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "64", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--lr", "3e-3",
               "--warmup-epochs", "0", "--device", "cpu", "--out", str(out), "--name", "m", *extra])
    assert rc == 0
    capsys.readouterr()
    pred = Predictor.from_checkpoint(out / "m", device="cpu")
    assert pred.meta["task"] == extra[1]
    res = pred.predict([image_folder / "test" / "red"], topk=2)
    assert len(res) == 3 and all(len(r["topk"]) == 2 for r in res)


def test_cli_refuses_fgvc_flags_without_the_task(image_folder, tmp_path, capsys):
    from finegrain.cli import main

    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "32", "--workers", "0", "--epochs", "1", "--device", "cpu",
               "--out", str(tmp_path / "runs"), "--pooling", "bilinear"])
    assert rc == 2
    assert "--task fgvc" in " ".join(capsys.readouterr().err.split())

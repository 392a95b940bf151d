"""Few-shot: class splits, the episodic sampler, the methods against hand computations, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from finegrain.data.base import ImageList
from finegrain.fewshot.evaluate import mean_ci95
from finegrain.fewshot.sampler import EpisodeCollate, EpisodicSampler, episode_labels, split_classes
from finegrain.models.backbone import create_backbone
from finegrain.tasks.fewshot import ProtoNetTask, build_method, fewshot_methods, maml_adapt


def _images(n_classes: int, per_class: int, source: str = "folder:x") -> ImageList:
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    return ImageList([f"/x/{i}.jpg" for i in range(len(labels))], labels, [f"c{c:03d}" for c in range(n_classes)], source=source)


def test_random_split_is_disjoint_seeded_and_complete():
    images = _images(30, 2)
    s = split_classes(images, fractions=(0.5, 0.2, 0.3), seed=3)
    assert [len(s[k]) for k in ("base", "val", "novel")] == [15, 6, 9]
    assert set(s["base"]).isdisjoint(s["val"]) and set(s["base"]).isdisjoint(s["novel"]) and set(s["val"]).isdisjoint(s["novel"])
    assert sorted(s["base"] + s["val"] + s["novel"]) == list(range(30))
    assert split_classes(images, fractions=(0.5, 0.2, 0.3), seed=3) == s
    assert split_classes(images, fractions=(0.5, 0.2, 0.3), seed=4) != s


def test_cub200_split_follows_class_id_order():
    s = split_classes(_images(200, 1, source="cub:/data/CUB_200_2011"))
    assert s == {"base": list(range(100)), "val": list(range(100, 150)), "novel": list(range(150, 200))}
    with pytest.raises(ValueError, match="200 CUB classes"):
        split_classes(_images(50, 1, source="cub:/x"), method="cub")
    assert len(split_classes(_images(50, 1, source="cub:/x"))["base"]) == 30  # auto: random for a CUB subset


def test_episodes_shape_classes_and_reproducibility():
    images = _images(10, 8)
    base = [0, 2, 4, 6, 8]
    s = EpisodicSampler(images.labels, n_way=3, k_shot=2, q_query=4, episodes=7, classes=base, seed=1)
    eps = list(s)
    assert len(eps) == 7 and all(len(e) == 3 * (2 + 4) for e in eps)
    for e in eps:
        labs = [images.labels[i] for i in e]
        assert set(labs) <= set(base) and len(set(labs)) == 3  # no leakage from other splits
        assert len(set(e)) == len(e)  # support and query never share an image
        support, query = labs[:6], labs[6:]
        assert support == [c for c in support[::2] for _ in range(2)]  # class-major blocks
        assert [support[0], support[2], support[4]] == query[::4]  # same slot order in the query block
    assert eps == list(EpisodicSampler(images.labels, n_way=3, k_shot=2, q_query=4, episodes=7, classes=base, seed=1))
    assert eps != list(EpisodicSampler(images.labels, n_way=3, k_shot=2, q_query=4, episodes=7, classes=base, seed=2))
    s.set_epoch(1)
    assert list(s) != eps
    assert episode_labels(2, 1, 2).tolist() == [0, 1, 0, 0, 1, 1]


def test_sampler_errors_name_the_problem():
    images = _images(4, 5)
    with pytest.raises(ValueError, match="5-way episodes need 5 classes but this split has 4"):
        EpisodicSampler(images, n_way=5, k_shot=1, q_query=1, episodes=1)
    with pytest.raises(ValueError, match=r"'c001' has 5"):
        EpisodicSampler(images, n_way=2, k_shot=3, q_query=3, episodes=1)  # class names from the ImageList
    labels = images.labels + [4, 4]
    with pytest.raises(ValueError, match=r"'c004' has 2"):
        EpisodicSampler(labels, n_way=2, k_shot=1, q_query=2, episodes=1, class_names=[f"c{c:03d}" for c in range(5)])


def test_episode_collate_drops_an_episode_with_a_broken_image():
    c = EpisodeCollate(2, 1, 1)
    items = [{"image": torch.zeros(3, 4, 4), "label": 7, "index": i} for i in range(4)]
    assert c(items)["label"].tolist() == [0, 1, 0, 1]
    assert c(items[:3] + [{"skipped": "x.jpg", "error": "bad"}])["image"] is None


def test_protonet_logits_match_a_hand_computation():
    task = ProtoNetTask(nn.Identity(), 0, n_way=2, k_shot=2)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    # prototypes (1, 0) and (0, 3)
    expected = -torch.tensor([[0.0 + 1.0, 1.0 + 4.0], [4.0 + 9.0, 9.0 + 0.0]])
    assert torch.allclose(task.episode_logits(support, labels, query, 2), expected)


def _linear_task():
    torch.manual_seed(0)
    return nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])


def test_maml_inner_step_is_a_manual_gradient_step():
    model, x, y = _linear_task()
    lr = 0.1
    w, b = model.weight.detach(), model.bias.detach()
    # cross-entropy gradient of a linear model by hand: dL/dz = (softmax(z) - onehot) / n
    dz = (torch.softmax(x @ w.t() + b, 1) - torch.nn.functional.one_hot(y, 2).float()) / len(y)
    adapted = maml_adapt(model, dict(model.named_parameters()), x, y, steps=1, inner_lr=lr, first_order=False)
    assert torch.allclose(adapted["weight"], w - lr * dz.t() @ x, atol=1e-6)
    assert torch.allclose(adapted["bias"], b - lr * dz.sum(0), atol=1e-6)


def _meta_grad(first_order: bool) -> torch.Tensor:
    model, x, y = _linear_task()
    params = dict(model.named_parameters())
    adapted = maml_adapt(model, params, x[:2], y[:2], steps=2, inner_lr=0.5, first_order=first_order)
    loss = torch.nn.functional.cross_entropy(functional_call(model, adapted, (x[2:],)), y[2:])
    return torch.autograd.grad(loss, params["weight"])[0]


def test_first_and_second_order_maml_differ_and_first_order_is_the_query_gradient():
    g1, g2 = _meta_grad(True), _meta_grad(False)
    assert not torch.allclose(g1, g2, atol=1e-5)  # the cross-entropy Hessian is not zero
    model, x, y = _linear_task()
    adapted = maml_adapt(model, dict(model.named_parameters()), x[:2], y[:2], steps=2, inner_lr=0.5, first_order=True)
    w = adapted["weight"].detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x[2:] @ w.t() + adapted["bias"].detach(), y[2:])
    assert torch.allclose(g1, torch.autograd.grad(loss, w)[0], atol=1e-6)


@pytest.mark.parametrize("method,kw", [("protonet", {}), ("relationnet", {}), ("relationnet", {"relation": "maps"}),
                                       ("maml", {"inner_steps": 1})])
@pytest.mark.parametrize("backbone", ["conv4", "test_resnet"])
def test_every_method_trains_on_an_episode(method, kw, backbone):
    torch.manual_seed(0)
    task = build_method(method, create_backbone(backbone, num_classes=0), n_way=3, k_shot=1, **kw)
    out = task({"image": torch.randn(3 * 3, 3, 32, 32), "label": episode_labels(3, 1, 2)})
    assert out["logits"].shape == (9, 3) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert [n for n, p in task.named_parameters() if p.grad is None] == []


def test_baseline_fits_the_support_set():
    torch.manual_seed(0)
    task = build_method("baseline", nn.Identity(), n_way=2, k_shot=3)
    support = torch.cat([torch.randn(3, 8) + 3, torch.randn(3, 8) - 3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert task.episode_logits(support, labels, support, 2).argmax(1).tolist() == labels.tolist()
    assert set(fewshot_methods()) == {"baseline", "maml", "protonet", "relationnet"}


def test_mean_ci95():
    mean, ci = mean_ci95([50.0, 70.0])
    assert mean == 60.0 and ci == pytest.approx(1.96 * 10.0 / 2**0.5)


def _colour_folder(root: Path, n_classes: int = 6, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        rgb = np.array([(c * 40) % 256, (c * 90 + 30) % 256, 255 - c * 35])
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rgb + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.jpg")
    return root


def test_cli_fewshot_train_then_eval(tmp_path, capsys):
    from finegrain.cli import main

    data = _colour_folder(tmp_path / "data")
    common = ["--data", str(data), "--n-way", "2", "--q-query", "2", "--img-size", "32", "--device", "cpu",
              "--split-fractions", "0.34", "0.33", "0.33"]
    rc = main(["fewshot", "train", *common, "--k-shot", "1", "--episodes", "3", "--epochs", "1", "--val-episodes", "2",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["best_checkpoint"]).is_file()
    rc = main(["fewshot", "eval", "--checkpoint", out["best_checkpoint"], *common, "--k-shot", "1", "2",
               "--episodes", "4", "--json"])
    assert rc == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert main(["fewshot", "train", *common, "--episodes", "1", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "already holds" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert result["method"] == "protonet" and [r["k_shot"] for r in result["results"]] == [1, 2]
    assert all(0 <= r["acc"] <= 100 and r["episodes"] == 4 for r in result["results"])
    # too many shots for 5 images per class: a clear error, exit status 2
    assert main(["fewshot", "eval", "--checkpoint", out["best_checkpoint"], *common, "--k-shot", "4", "--episodes", "1"]) == 2
    assert "has 5" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("method,args", [("baseline", {"head": "cosine", "steps": 5}), ("maml", {"eval_steps": 1}),
                                         ("relationnet", {"relation": "maps"})])
def test_evaluate_a_backbone_with_each_method(tmp_path, method, args):
    from finegrain.fewshot.run import evaluate_fewshot

    data = _colour_folder(tmp_path / "data", n_classes=3, per_class=4)
    r = evaluate_fewshot(data, backbone="conv4", method=method, split="all", n_way=3, k_shots=[1], q_query=2,
                         episodes=2, img_size=32, device="cpu", method_args=args)
    assert r["method"] == method and r["classes"] == 3 and len(r["results"]) == 1
    assert 0 <= r["results"][0]["acc"] <= 100


def test_evaluate_needs_one_model_source(tmp_path):
    from finegrain.fewshot.run import evaluate_fewshot

    with pytest.raises(ValueError, match="either a checkpoint or --backbone"):
        evaluate_fewshot(tmp_path)


def test_baseline_pretrains_on_base_classes_then_evaluates_on_novel(tmp_path):
    from finegrain.checkpoint import read_meta
    from finegrain.fewshot.run import evaluate_fewshot, fit_episodic

    data = _colour_folder(tmp_path / "data")
    kw = dict(n_way=2, q_query=2, img_size=32, device="cpu", split_fractions=(0.34, 0.33, 0.33))
    r = fit_episodic(data, out=tmp_path / "run", method="baseline", epochs=1, batch_size=4, val_episodes=2,
                     method_args={"steps": 3}, **kw)
    meta = read_meta(r["best_checkpoint"])
    assert meta["task"] == "fewshot_baseline" and meta["num_classes"] == 2  # 2 base classes of 6
    splits = meta["fewshot"]["splits"]
    assert sorted(splits["base"] + splits["val"] + splits["novel"]) == [f"class{c}" for c in range(6)]
    ev = evaluate_fewshot(data, checkpoint=r["best_checkpoint"], k_shots=[1], episodes=2, **kw)
    assert ev["method"] == "baseline" and ev["classes"] == 2

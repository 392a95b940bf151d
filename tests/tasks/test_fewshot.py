"""The few-shot methods against hand computations: ProtoNet, MAML, the baseline; every method trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from finegrain.fewshot.sampler import episode_labels
from finegrain.models.backbone import create_backbone
from finegrain.tasks.fewshot import ProtoNetTask, build_method, fewshot_methods, maml_adapt


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

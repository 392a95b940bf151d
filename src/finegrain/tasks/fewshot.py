"""Few-shot methods as Tasks that train on episodes with the one training loop.

- ProtoNet: Snell et al., "Prototypical Networks for Few-shot Learning", arXiv:1703.05175.
- RelationNet: Sung et al., "Learning to Compare: Relation Network for Few-Shot Learning",
  arXiv:1711.06025.
- MAML: Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
  arXiv:1703.03400 (second order, or first order with ``first_order=True``).
- Baseline and Baseline++: Chen et al., "A Closer Look at Few-shot Classification",
  arXiv:1904.04232 (a classifier of the base classes, then frozen embeddings + a classifier
  fine-tuned on the support set; Baseline++ uses a cosine classifier for both).

A batch is an episode laid out by :class:`finegrain.fewshot.sampler.EpisodicSampler`: the first
``n_way * k_shot`` rows are the support set, the rest the queries, and labels are episode slots
``0..n_way-1``. Every method exposes the same two steps, so training (``forward``) and
evaluation on precomputed features (:func:`finegrain.fewshot.evaluate.evaluate_episodes`) share
them: ``features(images)`` and ``episode_logits(support_features, support_labels,
query_features, n_way)``. ``forward`` returns logits for every row (support rows too, so the
loop's accuracy counts them) and the loss over the queries only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from finegrain.models import conv4  # noqa: F401  (registers conv4 with timm)
from finegrain.registry import close_matches
from finegrain.tasks.base import TASKS, Task, TaskOptions, option


def fewshot_methods() -> dict[str, type[EpisodicTask]]:
    """The few-shot methods by their ``--method`` name: the registered tasks that derive from :class:`EpisodicTask`."""
    found = {}
    for name in TASKS.names():
        cls = TASKS.get(name)
        if isinstance(cls, type) and issubclass(cls, EpisodicTask):
            found[cls.method] = cls
    return found


def fewshot_method(name: str) -> type[EpisodicTask]:
    """The task class of few-shot method ``name`` (``ValueError`` naming the methods otherwise)."""
    methods = fewshot_methods()
    if name not in methods:
        hint = close_matches(name, list(methods))
        raise ValueError(f"unknown few-shot method {name!r}; available: {', '.join(sorted(methods))}"
                         + (f". Did you mean {' or '.join(map(repr, hint))}?" if hint else ""))
    return methods[name]


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logit embeddings of a timm-contract model: ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means ``[n_way, ...]`` of the support features."""
    return torch.stack([support[labels == c].mean(0) for c in range(n_way)])


def class_sums(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-class sums ``[n_way, ...]`` of the support features (RelationNet's K-shot class feature)."""
    return torch.stack([support[labels == c].sum(0) for c in range(n_way)])


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` squared Euclidean distances (exact, no ``a^2 - 2ab + b^2`` cancellation)."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


class EpisodicTask(Task):
    """Base of the few-shot tasks (see the module docstring for the batch layout).

    Args:
        model: timm-contract backbone.
        num_classes: outputs of the backbone's classifier (0 for the metric methods).
        n_way: classes per training episode.
        k_shot: support images per class in a training episode.
    """

    method = "base"
    episodic = True  # trained on episodes (False: on ordinary batches)
    trainer = "episodic"
    selection_metric = "val_acc"
    outputs = "embeddings"  # compared with a support set; there is no fixed class list

    def __init__(self, model: nn.Module, num_classes: int, *, n_way: int = 5, k_shot: int = 1, label_smoothing: float = 0.0):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        self.n_way, self.k_shot = n_way, k_shot

    @staticmethod
    def head_classes(n_way: int) -> int:
        """Classifier outputs the backbone needs for this method."""
        return 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return embed(self.model, images)

    def episode_logits(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
        raise NotImplementedError

    def episode_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        ns = self.n_way * self.k_shot
        if x.shape[0] <= ns:
            raise ValueError(f"an episode of {x.shape[0]} images has no queries after {ns} support images ({self.n_way}-way {self.k_shot}-shot)")
        feats = self.features(x)
        logits = self.episode_logits(feats[:ns], y[:ns], feats, self.n_way)
        return {"loss": self.episode_loss(logits[ns:], y[ns:]), "logits": logits}

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (there is no fixed class list to score against)."""
        return self.features(images)

    def task_args(self) -> dict[str, Any]:
        return {"n_way": self.n_way, "k_shot": self.k_shot}


@TASKS.register("protonet")
class ProtoNetTask(EpisodicTask):
    """Logits are negative squared Euclidean distances to the class-mean prototypes."""

    name = method = "protonet"

    def episode_logits(self, support, labels, query, n_way):
        return -squared_euclidean(query.flatten(1), prototypes(support.flatten(1), labels, n_way))


class _RelationModule(nn.Module):
    """Sung et al.'s relation module: two conv blocks (conv, BN, ReLU) of 64 channels, FC ``hidden``, FC 1, sigmoid.

    ``maps=True`` takes concatenated feature maps ``[N, 2C, H, W]`` and uses 3x3 convolutions as
    in the paper; the paper max-pools after each block, but timm feature maps can be 1x1-7x7, so
    the maps are average-pooled once after the blocks instead. ``maps=False`` takes concatenated
    pooled embeddings ``[N, 2C]`` as a 1x1 map, where the same blocks are 1x1 convolutions.

    The batch norm in the blocks is the paper's and is what keeps the module training: with the
    concatenation fed straight into one ``Linear(2C, 8)`` + ReLU (this module before Dec 2026) the
    units die under the MSE target, the score becomes a constant 1/N and accuracy sits at chance
    (cub50 novel classes, 5-way: 20.3% 1-shot, 20.1% 5-shot; tests/tasks/test_fewshot.py trains
    both on synthetic episodes of unseen classes).
    """

    def __init__(self, channels: int, *, maps: bool, hidden: int = 8, width: int = 64):
        super().__init__()
        self.maps = maps
        k = 3 if maps else 1
        block = lambda i, o: [nn.Conv2d(i, o, k, padding=k // 2), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]  # noqa: E731
        self.body = nn.Sequential(*block(2 * channels, width), *block(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.score = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        x = pairs if self.maps else pairs[:, :, None, None]
        return torch.sigmoid(self.score(self.body(x))).squeeze(-1)


@dataclass
class RelationNetOptions(TaskOptions):
    relation: str = option("pooled", "RelationNet: compare pooled embeddings or feature maps (pooled, maps)", flag="relation")
    hidden: int = option(8, "RelationNet: width of the relation module's hidden layer", flag="relation-hidden")

    def check(self) -> None:
        if self.relation not in ("maps", "pooled"):
            raise ValueError(f"--relation must be maps or pooled, got {self.relation!r}")


@TASKS.register("relationnet")
class RelationNetTask(EpisodicTask):
    """A learned relation module scores (class feature, query) pairs; MSE to the one-hot target.

    The class feature is the element-wise sum of the class's K support embeddings, as in Sung
    et al. (arXiv:1711.06025, Sec. 3.3: "we element-wise sum over the embedding module outputs of
    all samples from each training class"), not their mean: with K > 1 shots the relation module
    sees K times the one-shot magnitude, which it learns for the episode shape it trains on.

    Args:
        relation: "maps" concatenates backbone feature maps (``forward_features``, ``[B, C, H, W]``)
            as in the paper; "pooled" concatenates pre-logit embeddings (works for any backbone).
        hidden: width of the relation module's hidden layer.
    """

    name = method = "relationnet"
    Options = RelationNetOptions

    def __init__(self, model, num_classes, *, n_way=5, k_shot=1, relation: str = "pooled", hidden: int = 8, label_smoothing=0.0):
        super().__init__(model, num_classes, n_way=n_way, k_shot=k_shot, label_smoothing=label_smoothing)
        if relation not in ("maps", "pooled"):
            raise ValueError(f"relation must be 'maps' or 'pooled', got {relation!r}")
        self.relation, self.hidden = relation, hidden
        self.relation_module = _RelationModule(model.num_features, maps=relation == "maps", hidden=hidden)

    def features(self, images):
        if self.relation == "maps":
            f = self.model.forward_features(images)
            if f.ndim != 4:
                raise ValueError(f"relation='maps' needs [B, C, H, W] feature maps; this backbone gives shape {tuple(f.shape)}. Use relation='pooled'")
            return f
        return embed(self.model, images)

    def episode_logits(self, support, labels, query, n_way):
        protos = class_sums(support, labels, n_way)
        q, n = query.shape[0], protos.shape[0]
        pairs = torch.cat([protos[None].expand(q, *protos.shape), query[:, None].expand(q, n, *query.shape[1:])], dim=2)
        return self.relation_module(pairs.flatten(0, 1)).view(q, n)

    def episode_loss(self, logits, labels):
        return F.mse_loss(logits.float(), F.one_hot(labels, logits.shape[1]).float())

    def task_args(self):
        return {**super().task_args(), "relation": self.relation, "hidden": self.hidden}


def maml_adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    inner_lr: float,
    first_order: bool,
    buffers: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """MAML's inner loop: ``steps`` plain gradient steps on ``(x, y)``, functionally.

    With ``first_order=False`` the inner gradients keep their graph (``create_graph=True``), so
    the outer gradient includes the second-order term; with ``first_order=True`` they are
    constants and the outer gradient is the query gradient at the adapted weights.

    Returns:
        The adapted parameters (same names as ``params``).
    """
    buffers = dict(model.named_buffers()) if buffers is None else buffers
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, (params, buffers), (x,)).float(), y)
        names = [n for n, p in params.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
        new = dict(params)
        for n, g in zip(names, grads):
            if g is not None:
                new[n] = params[n] - inner_lr * (g.detach() if first_order else g)
        params = new
    return params


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer of ``model`` normalises with the statistics of its own batch.

    The layers in eval mode are switched to train mode (the other layers keep their mode: no
    dropout is turned on) and back on exit. Pass the network copies of its buffers (as
    :meth:`MAMLTask.episode_logits` does) to keep its running statistics unchanged.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
    for m in norms:
        m.train()
    try:
        yield
    finally:
        for m in norms:
            m.eval()


@dataclass
class MAMLOptions(TaskOptions):
    inner_steps: int = option(5, "MAML: inner steps while training", flag="inner-steps")
    eval_steps: int = option(10, "MAML: inner steps at evaluation", flag="eval-steps")
    inner_lr: float = option(0.01, "MAML: inner learning rate", flag="inner-lr")
    first_order: bool = option(False, "MAML: first-order approximation", flag="first-order")


@TASKS.register("maml")
class MAMLTask(EpisodicTask):
    """Adapt the whole network (classifier of ``n_way`` outputs included) on the support set.

    At meta-test (the task in eval mode) BatchNorm normalises the support set, and then the
    queries, with each one's own batch statistics, never with running statistics: transductive
    batch norm, as in the authors' reference code (Finn et al., arXiv:1703.03400; cbfinn/maml
    normalises with batch statistics at test time, and so do learn2learn's MAML examples). The
    running statistics are neither used nor updated by an evaluation episode.

    Args:
        inner_steps: inner gradient steps while training.
        eval_steps: inner gradient steps at evaluation.
        inner_lr: inner learning rate.
        first_order: drop the second-order term (FOMAML).
    """

    name = method = "maml"
    outputs = "logits over episode slots before adaptation"
    Options = MAMLOptions

    def __init__(self, model, num_classes, *, n_way=5, k_shot=1, inner_steps: int = 5, eval_steps: int = 10,
                 inner_lr: float = 0.01, first_order: bool = False, label_smoothing=0.0):
        super().__init__(model, num_classes, n_way=n_way, k_shot=k_shot, label_smoothing=label_smoothing)
        if num_classes != n_way:
            raise ValueError(f"MAML needs a backbone classifier with n_way={n_way} outputs, got {num_classes}")
        self.inner_steps, self.eval_steps, self.inner_lr, self.first_order = inner_steps, eval_steps, inner_lr, first_order

    @staticmethod
    def head_classes(n_way: int) -> int:
        return n_way

    def features(self, images):
        return images  # MAML adapts the whole network, so its "features" are the images

    def episode_logits(self, support, labels, query, n_way):
        if n_way != self.num_classes:
            raise ValueError(f"this MAML model has a {self.num_classes}-way head; evaluate it with --n-way {self.num_classes}")
        training = self.training and torch.is_grad_enabled()
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        if training:
            return self._adapt_and_score(params, buffers, support, labels, query, training=True)
        # evaluation: adapt a detached copy (first order is enough), batch statistics on copied buffers
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
        with batch_statistics(self.model):
            out = self._adapt_and_score(params, {n: b.clone() for n, b in buffers.items()}, support, labels, query,
                                        training=False)
        return out.detach()

    def _adapt_and_score(self, params, buffers, support, labels, query, *, training: bool) -> torch.Tensor:
        with torch.enable_grad():
            adapted = maml_adapt(self.model, params, support, labels, steps=self.inner_steps if training else self.eval_steps,
                                 inner_lr=self.inner_lr, first_order=self.first_order or not training, buffers=buffers)
        return functional_call(self.model, (adapted, buffers), (query,))

    def infer(self, images):
        return self.model(images)

    def task_args(self):
        return {**super().task_args(), "inner_steps": self.inner_steps, "eval_steps": self.eval_steps,
                "inner_lr": self.inner_lr, "first_order": self.first_order}


def fit_support_head(
    support: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    *,
    head: str = "linear",
    steps: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    scale: float = 10.0,
    seed: int = 0,
) -> nn.Module:
    """Train a linear or cosine classifier on frozen support embeddings (Chen et al.'s fine-tuning).

    Full-batch SGD (momentum 0.9) for ``steps`` steps; the cosine head scores
    ``scale * cos(w_c, x)``.
    """
    if head not in ("linear", "cosine"):
        raise ValueError(f"head must be 'linear' or 'cosine', got {head!r}")
    g = torch.Generator().manual_seed(seed)
    dim = support.shape[1]
    weight = nn.Parameter(torch.randn(n_way, dim, generator=g).to(support) * dim**-0.5)
    bias = nn.Parameter(torch.zeros(n_way, device=support.device)) if head == "linear" else None
    params = [weight] + ([bias] if bias is not None else [])
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    x = support.detach().float()

    def logits_fn(f: torch.Tensor) -> torch.Tensor:
        if head == "cosine":
            return scale * F.normalize(f, dim=1) @ F.normalize(weight, dim=1).t()
        return F.linear(f, weight, bias)

    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(logits_fn(x), labels).backward()
            opt.step()
    return _Head(logits_fn)


class _Head(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class CosineClassifier(nn.Module):
    """Baseline++'s classifier: ``scale * g_c * cos(x, v_c)`` (Chen et al., arXiv:1904.04232, Sec. 3.2).

    As the authors' ``distLinear`` (CloserLookFewShot): the weight is weight-normalised per
    class (direction ``v_c`` and a learnable norm ``g_c`` that starts at ``||v_c||``), the
    inputs are L2-normalised, and the fixed scale is 2 for up to 200 classes, else 10.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float | None = None):
        super().__init__()
        linear = nn.Linear(in_features, num_classes, bias=False)  # torch's default init, as the authors'
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.gain = nn.Parameter(self.weight.detach().norm(dim=1))
        self.scale = float(scale) if scale else (2.0 if num_classes <= 200 else 10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gain[:, None] * F.normalize(self.weight, dim=1)
        return self.scale * F.normalize(x, dim=1, eps=1e-5) @ w.t()


@dataclass
class BaselineOptions(TaskOptions):
    head: str = option("linear", "baseline: classifier of the base classes and of each support set: linear (Baseline) "
                       "or cosine (Baseline++)", flag="head")
    steps: int = option(100, "baseline: fine-tuning steps per episode", flag="finetune-steps")
    lr: float = option(0.01, "baseline: fine-tuning learning rate", flag="finetune-lr")

    def check(self) -> None:
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"--head must be linear or cosine, got {self.head!r}")


@TASKS.register("fewshot_baseline")
class BaselineTask(EpisodicTask):
    """A classifier of the base classes, then frozen embeddings + a classifier fine-tuned on each support set.

    Args:
        head: "linear" (Baseline: the backbone's linear classifier on the base classes, a linear
            head on each support set) or "cosine" (Baseline++: a :class:`CosineClassifier` on the
            base classes, replacing the backbone's own, and a cosine head on each support set).
        steps: fine-tuning steps per episode.
        lr: fine-tuning learning rate.
    """

    name = "fewshot_baseline"
    method = "baseline"
    Options = BaselineOptions
    episodic = False  # trained on ordinary batches of the base classes, evaluated on episodes

    def __init__(self, model, num_classes, *, n_way=5, k_shot=1, head: str = "linear", steps: int = 100,
                 lr: float = 0.01, label_smoothing=0.0):
        super().__init__(model, num_classes, n_way=n_way, k_shot=k_shot, label_smoothing=label_smoothing)
        if head not in ("linear", "cosine"):
            raise ValueError(f"--head must be linear or cosine, got {head!r}")
        self.head, self.steps, self.lr = head, steps, lr
        self.base_head: nn.Module | None = None
        if head == "cosine" and num_classes:
            model.reset_classifier(0)
            self.base_head = CosineClassifier(model.num_features, num_classes)

    def episode_logits(self, support, labels, query, n_way):
        clf = fit_support_head(support.flatten(1), labels, n_way, head=self.head, steps=self.steps, lr=self.lr)
        with torch.no_grad():
            return clf(query.flatten(1).float())

    def forward(self, batch):
        """Baseline pre-training is plain classification of the base classes (a normal batch)."""
        if self.num_classes == 0:
            raise ValueError("this baseline has no base-class classifier to train; build it with num_classes = base classes")
        images = batch["image"]
        logits = self.model(images) if self.base_head is None else self.base_head(embed(self.model, images))
        return {"loss": F.cross_entropy(logits.float(), batch.get("target", batch["label"]), label_smoothing=self.label_smoothing),
                "logits": logits}

    def task_args(self):
        return {**super().task_args(), "head": self.head, "steps": self.steps, "lr": self.lr}


def build_method(name: str, model: nn.Module, *, n_way: int, k_shot: int, **kwargs: Any) -> EpisodicTask:
    """Wrap ``model`` in few-shot method ``name``; the classifier is reset to what the method needs."""
    cls = fewshot_method(name)
    n_out = cls.head_classes(n_way)
    if hasattr(model, "reset_classifier") and getattr(model, "num_classes", None) != n_out:
        model.reset_classifier(n_out)
    return cls(model, n_out, n_way=n_way, k_shot=k_shot, **kwargs)

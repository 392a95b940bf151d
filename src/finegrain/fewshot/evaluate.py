"""Few-shot evaluation: features computed once per image, then many seeded episodes over them.

Accuracy is reported as the mean over episodes with a 95% confidence interval
``1.96 * std / sqrt(episodes)``, the convention of the few-shot literature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from finegrain.data.base import ImageList
from finegrain.data.dataset import ImageDataset, collate
from finegrain.fewshot.sampler import EpisodicSampler
from finegrain.tasks.fewshot import EpisodicTask
from finegrain.train.loop import predict_loader
from finegrain.utils import progress_bar


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (population std, as in most few-shot code)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no values to average")
    return t.mean().item(), 1.96 * t.std(unbiased=False).item() / math.sqrt(t.numel())


def compute_features(task: EpisodicTask, images: ImageList, transform, *, device: torch.device, batch_size: int = 64,
                     workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``task.features`` of every readable image: ``(features [N, ...], labels [N], skipped)``."""
    task.eval()
    loader = DataLoader(ImageDataset(images, transform), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return predict_loader(task.features, loader, device=device)


def evaluate_episodes(
    task: EpisodicTask,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_way: int,
    k_shot: int,
    q_query: int,
    episodes: int,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Accuracy of ``task.episode_logits`` over seeded episodes drawn from precomputed features.

    Returns:
        dict with ``acc`` and ``ci95`` (percent), ``episodes``, ``n_way``, ``k_shot``, ``q_query``
        and ``per_episode`` accuracies.
    """
    sampler = EpisodicSampler(labels.tolist(), n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=episodes,
                              classes=classes, class_names=class_names, seed=seed)
    task.eval()
    ns = n_way * k_shot
    y_support = torch.arange(n_way, device=device).repeat_interleave(k_shot)
    y_query = torch.arange(n_way, device=device).repeat_interleave(q_query)
    accs = []
    with progress_bar(f"{n_way}-way {k_shot}-shot", total=episodes, unit="episode") as bar:  # MAML: seconds per episode
        for idx in sampler:
            f = features[idx].to(device)
            logits = task.episode_logits(f[:ns], y_support, f[ns:], n_way)
            accs.append(100.0 * (logits.argmax(1) == y_query).float().mean().item())
            bar.advance(1, acc=sum(accs) / len(accs))
    mean, ci = mean_ci95(accs)
    return {"acc": mean, "ci95": ci, "episodes": episodes, "n_way": n_way, "k_shot": k_shot, "q_query": q_query,
            "per_episode": accs}

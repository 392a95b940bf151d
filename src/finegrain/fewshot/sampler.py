"""Episodes for few-shot learning: disjoint class splits and an N-way K-shot episodic sampler.

An episode is one batch: ``n_way * k_shot`` support images (class-major), then
``n_way * q_query`` query images (class-major). Its labels are the episode-local class slots
``0..n_way-1`` (:func:`episode_labels`), so a Task can split the batch by position.

The CUB-200 class split follows the class-id convention of Chen et al., "A Closer Look at
Few-shot Classification" (arXiv:1904.04232): base = classes 1-100, val = 101-150, novel = 151-200.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from finegrain.data.base import ImageList
from finegrain.data.dataset import collate

SPLITS = ("base", "val", "novel")
SPLIT_METHODS = ("auto", "cub", "ordered", "random")


def split_classes(
    images: ImageList,
    *,
    method: str = "auto",
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Split the class ids of ``images`` into disjoint ``base``/``val``/``novel`` lists.

    Args:
        method: "cub" is the CUB-200 convention (100/50/50 by class id order; needs 200 classes);
            "ordered" cuts the classes in class-id order by ``fractions`` (the CUB convention for a
            subset of CUB, or any other class count); "random" shuffles the classes with ``seed``
            and cuts them by ``fractions``; "auto" is
            "cub" for a CUB data set with 200 classes and "random" otherwise.
        fractions: base/val/novel class fractions for "ordered" and "random" (normalised to sum to 1).
        seed: seed of the "random" split.

    Returns:
        ``{"base": [...], "val": [...], "novel": [...]}``, each sorted.
    """
    n = len(images.classes)
    if method not in SPLIT_METHODS:
        raise ValueError(f"class split method must be one of {', '.join(SPLIT_METHODS)}, got {method!r}")
    is_cub200 = images.source.startswith("cub:") and n == 200
    if method == "cub" or (method == "auto" and is_cub200):
        if n != 200:
            raise ValueError(f"the CUB class split needs the 200 CUB classes, got {n}; use --split-method random")
        return {"base": list(range(100)), "val": list(range(100, 150)), "novel": list(range(150, 200))}
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"class fractions must be three non-negative numbers (base val novel), got {fractions}")
    total = sum(fractions)
    order = list(range(n))
    if method != "ordered":
        random.Random(seed).shuffle(order)
    n_base = round(n * fractions[0] / total)
    n_val = round(n * fractions[1] / total)
    n_base, n_val = min(n_base, n), min(n_val, n - min(n_base, n))
    parts = order[:n_base], order[n_base : n_base + n_val], order[n_base + n_val :]
    return {name: sorted(p) for name, p in zip(SPLITS, parts)}


def episode_labels(n_way: int, k_shot: int, q_query: int) -> torch.Tensor:
    """Episode-local labels of a batch laid out as support (class-major) then query (class-major)."""
    ways = torch.arange(n_way)
    return torch.cat([ways.repeat_interleave(k_shot), ways.repeat_interleave(q_query)])


class EpisodicSampler(Sampler[list[int]]):
    """Yields episodes of dataset indices; use it as a DataLoader ``batch_sampler``.

    Episode ``i`` depends only on ``(seed, epoch, i)``, so runs are reproducible and an
    evaluation with the same seed sees the same episodes.

    Args:
        labels: an ``ImageList`` (its labels and class names are used), or the class label of
            every image.
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        episodes: episodes per pass.
        classes: the class ids episodes draw from (one split); default all classes present.
        class_names: names used in error messages (default ``class <id>``).
        seed: seed of the episode draws.
    """

    def __init__(
        self,
        labels: ImageList | Sequence[int],
        *,
        n_way: int,
        k_shot: int,
        q_query: int,
        episodes: int,
        classes: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
    ):
        if n_way < 1 or k_shot < 1 or q_query < 0 or episodes < 1:
            raise ValueError(
                f"need n_way >= 1, k_shot >= 1, q_query >= 0 and episodes >= 1; got n_way={n_way}, "
                f"k_shot={k_shot}, q_query={q_query}, episodes={episodes}"
            )
        if isinstance(labels, ImageList):
            class_names = labels.classes if class_names is None else class_names
            labels = labels.labels
        by_class: dict[int, list[int]] = {}
        for i, l in enumerate(labels):
            by_class.setdefault(int(l), []).append(i)
        classes = sorted(by_class) if classes is None else sorted(int(c) for c in classes)
        name = (lambda c: class_names[c]) if class_names is not None else (lambda c: f"class {c}")  # noqa: E731
        if n_way > len(classes):
            raise ValueError(
                f"{n_way}-way episodes need {n_way} classes but this split has {len(classes)}; lower --n-way "
                "or give the split more classes"
            )
        need = k_shot + q_query
        short = [(c, len(by_class.get(c, []))) for c in classes if len(by_class.get(c, [])) < need]
        if short:
            listing = ", ".join(f"{name(c)!r} has {n}" for c, n in short[:5])
            raise ValueError(
                f"{k_shot}-shot episodes with {q_query} queries need {need} images per class: {listing} "
                f"({len(short)} classes too small); lower --k-shot/--q-query or drop those classes"
            )
        self.by_class = {c: by_class[c] for c in classes}
        self.classes = classes
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.episodes, self.seed, self.epoch, self.start = episodes, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw a different (still seeded) set of episodes for each training epoch, from episode ``start`` on (resume)."""
        self.epoch, self.start = epoch, start

    def episode(self, i: int) -> list[int]:
        """Indices of episode ``i``: support block then query block, both class-major."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        ways = rng.sample(self.classes, self.n_way)
        picks = [rng.sample(self.by_class[c], self.k_shot + self.q_query) for c in ways]
        support = [j for p in picks for j in p[: self.k_shot]]
        query = [j for p in picks for j in p[self.k_shot :]]
        return support + query

    def __iter__(self) -> Iterator[list[int]]:
        return (self.episode(i) for i in range(self.start, self.episodes))

    def __len__(self) -> int:
        return self.episodes - self.start


class EpisodeCollate:
    """``collate`` for episodes: labels become the episode-local slots ``0..n_way-1``.

    An episode with an unreadable image is dropped whole (``image`` None, so the training loop
    skips it and reports the file): a missing support image would shift every slot after it.
    """

    def __init__(self, n_way: int, k_shot: int, q_query: int):
        self.labels = episode_labels(n_way, k_shot, q_query)

    def __call__(self, items: list[dict]) -> dict:
        batch = collate(items)
        if batch["skipped"] or batch["image"] is None:
            return {"image": None, "label": None, "index": None, "skipped": batch["skipped"]}
        batch["global_label"] = batch["label"]
        batch["label"] = self.labels.clone()
        return batch

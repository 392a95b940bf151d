"""Few-shot class splits, the episodic sampler and the episode collate."""

from __future__ import annotations

import pytest
import torch

from finegrain.data.base import ImageList
from finegrain.fewshot.sampler import EpisodeCollate, EpisodicSampler, episode_labels, split_classes


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


def test_ordered_split_cuts_class_ids_in_order_by_fractions():
    s = split_classes(_images(50, 1, source="cub:/x"), method="ordered", fractions=(0.4, 0.2, 0.4), seed=7)
    assert s == {"base": list(range(20)), "val": list(range(20, 30)), "novel": list(range(30, 50))}
    assert split_classes(_images(50, 1), method="ordered", fractions=(0.4, 0.2, 0.4), seed=8) == s  # no seed in it

"""Class taxonomies: hierarchical answers ("a warbler, species uncertain") and mistakes measured by how far apart they are.

A :class:`Taxonomy` maps each class (a leaf) and each inner node to its parent. It comes from the
data set (NABirds' ``hierarchy.txt``, FGVC-Aircraft's variant -> family -> manufacturer) or a
user's CSV of ``class,parent`` rows (parents may have parents of their own), and is stored in
the checkpoint (``CheckpointMeta.hierarchy``).

- **Roll-up**: when the top class's probability is below a threshold, the answer is the deepest
  ancestor whose summed probability (over the classes below it) reaches it; the answer names the
  node and its level (1 = parent). This is the "deepest confident ancestor" rule of camera-trap
  pipelines, and of Deng et al., "Hedging your bets", CVPR 2012, with a fixed threshold.
- **Level accuracy**: top-1 after mapping the true and predicted classes to their ancestor ``l``
  levels up.
- **Mistake severity**: for a wrong prediction, the height above the true class of the lowest
  common ancestor of the true and predicted classes (Bertinetto et al., "Making Better
  Mistakes", CVPR 2020); classes with no common ancestor count the deepest chain plus one.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Taxonomy:
    """Parents of classes and inner nodes; ``level_names`` name the levels above the classes, when known."""

    def __init__(self, parents: dict[str, str], level_names: Sequence[str] | None = None):
        self.parents = {str(c): str(p) for c, p in parents.items() if str(c) != str(p)}
        self.level_names = list(level_names) if level_names else None
        for start in self.parents:  # refuse cycles: a parent chain must end
            seen, node = {start}, start
            while node in self.parents:
                node = self.parents[node]
                if node in seen:
                    raise ValueError(f"the class hierarchy has a cycle through {node!r}")
                seen.add(node)

    def ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... up to the root (empty for a class without a parent)."""
        out, node = [], name
        while node in self.parents:
            node = self.parents[node]
            out.append(node)
        return out

    def ancestor_at(self, name: str, level: int) -> str:
        """The node ``level`` steps above ``name`` (the root when the chain is shorter; ``name`` at level 0)."""
        chain = [name, *self.ancestors(name)]
        return chain[min(level, len(chain) - 1)]

    def depth(self, classes: Sequence[str]) -> int:
        """The longest parent chain above any of ``classes``."""
        return max((len(self.ancestors(c)) for c in classes), default=0)

    def level_name(self, level: int) -> str:
        if level == 0:
            return "class"
        if self.level_names and level <= len(self.level_names):
            return self.level_names[level - 1]
        return f"level {level}"

    def to_dict(self) -> dict[str, Any]:
        return {"parents": dict(self.parents), "level_names": self.level_names}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Taxonomy | None:
        return None if not d else cls(d.get("parents", {}), d.get("level_names"))

    @classmethod
    def from_csv(cls, path: str | Path) -> Taxonomy:
        """A CSV of ``class,parent`` rows (a header row naming them is optional)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hierarchy file {path} does not exist (a CSV of class,parent rows)")
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
        if rows and [x.strip().lower() for x in rows[0][:2]] == ["class", "parent"]:
            rows = rows[1:]
        bad = [i for i, r in enumerate(rows, 1) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
        if bad or not rows:
            raise ValueError(f"{path}: expected rows 'class,parent'" + (f"; row {bad[0]} is not" if bad else "; the file is empty"))
        return cls({r[0].strip(): r[1].strip() for r in rows})

    def check_classes(self, classes: Sequence[str], source: str = "the hierarchy") -> None:
        """Refuse a taxonomy that names none of ``classes`` (a CSV for another data set)."""
        if not any(c in self.parents for c in classes):
            raise ValueError(f"{source} gives a parent for none of the {len(classes)} classes (e.g. {classes[0]!r}); "
                             "its first column must hold the class names")


def rollup(probs: torch.Tensor, classes: Sequence[str], taxonomy: Taxonomy, threshold: float) -> dict[str, Any]:
    """The answer for one probability vector: the top class if it reaches ``threshold``, else the deepest confident ancestor.

    Returns ``{"name", "level", "level_name", "score"}``; ``level`` 0 is the class itself. When no
    node reaches the threshold (several roots), the best root is returned with its score.
    """
    probs = probs.double()
    top = int(probs.argmax())
    if probs[top] >= threshold:
        return {"name": classes[top], "level": 0, "level_name": "class", "score": float(probs[top])}
    mass: dict[tuple[int, str], float] = {}
    for c, p in zip(classes, probs.tolist()):
        for level, node in enumerate(taxonomy.ancestors(c), 1):
            mass[(level, node)] = mass.get((level, node), 0.0) + p
    if not mass:
        return {"name": classes[top], "level": 0, "level_name": "class", "score": float(probs[top])}
    confident = [(level, p, node) for (level, node), p in mass.items() if p >= threshold]
    level, p, node = min(confident, key=lambda t: (t[0], -t[1])) if confident else max(
        ((lv, p, n) for (lv, n), p in mass.items()), key=lambda t: (t[1], -t[0]))
    return {"name": node, "level": level, "level_name": taxonomy.level_name(level), "score": float(p)}


def level_accuracy(pred: Sequence[int], true: Sequence[int], classes: Sequence[str], taxonomy: Taxonomy) -> dict[str, float]:
    """Top-1 (percent) at each level above the classes: predicted and true classes mapped ``l`` levels up."""
    out = {}
    for level in range(taxonomy.depth(classes) + 1):
        hits = [taxonomy.ancestor_at(classes[p], level) == taxonomy.ancestor_at(classes[t], level) for p, t in zip(pred, true)]
        out[taxonomy.level_name(level)] = 100.0 * float(np.mean(hits)) if hits else 0.0
    return out


def mistake_severity(pred: int, true: int, classes: Sequence[str], taxonomy: Taxonomy) -> int:
    """Height above the true class of the lowest common ancestor of ``pred`` and ``true`` (0 when equal)."""
    if pred == true:
        return 0
    true_chain = [classes[true], *taxonomy.ancestors(classes[true])]
    pred_side = {classes[pred], *taxonomy.ancestors(classes[pred])}
    for height, node in enumerate(true_chain):
        if node in pred_side:
            return height
    return taxonomy.depth(classes) + 1


def hierarchy_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], taxonomy: Taxonomy,
                      *, rollup_threshold: float | None = None) -> dict[str, Any]:
    """Accuracy per level, mean mistake severity (over mistakes and over all images), and with a roll-up
    threshold, how often the answer rolled up and how often the rolled-up answer was right."""
    pred, true = logits.argmax(1).tolist(), labels.tolist()
    severities = [mistake_severity(p, t, classes, taxonomy) for p, t in zip(pred, true)]
    mistakes = [s for s in severities if s > 0]
    out: dict[str, Any] = {"level_accuracy": level_accuracy(pred, true, classes, taxonomy),
                           "mistake_severity": float(np.mean(mistakes)) if mistakes else 0.0,
                           "mean_severity_all": float(np.mean(severities)) if severities else 0.0,
                           "levels": [taxonomy.level_name(lv) for lv in range(taxonomy.depth(classes) + 1)]}
    if rollup_threshold is not None:
        answers = [rollup(p, classes, taxonomy, rollup_threshold) for p in logits.float().softmax(1)]
        right = [a["name"] == taxonomy.ancestor_at(classes[t], a["level"]) for a, t in zip(answers, true)]
        out["rollup"] = {"threshold": rollup_threshold, "rolled_up": float(np.mean([a["level"] > 0 for a in answers])),
                         "correct": 100.0 * float(np.mean(right)),
                         "answers_by_level": {taxonomy.level_name(lv): sum(a["level"] == lv for a in answers)
                                              for lv in range(taxonomy.depth(classes) + 1)}}
    return out


def taxonomy_of(images: Any) -> Taxonomy | None:
    """The taxonomy a reader attached to an ``ImageList`` (``extras["hierarchy"]``), if any."""
    return Taxonomy.from_dict(getattr(images, "extras", {}).get("hierarchy"))

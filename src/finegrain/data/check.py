"""``check_data``: find problems in an image data set before training on it.

Reports unreadable files, exact duplicates (sha256 of the bytes), near duplicates (perceptual
hashes), duplicates shared by train and test (leaks), tiny or extreme-aspect images and class
imbalance. It only reads the images: nothing is modified, moved or deleted. A clean split can be
written as a CSV that the ``csv`` reader accepts.

Perceptual hashes (both 64 bits, compared by Hamming distance):
  * dHash: signs of horizontal gradients of a 9x8 grey thumbnail (N. Krawetz, "Kind of Like
    That", hackerfactor.com, 2013);
  * pHash: signs of the 8x8 lowest-frequency DCT coefficients of a 32x32 grey thumbnail relative
    to their median (Zauner, "Implementation and Benchmarking of Perceptual Image Hash
    Functions", 2010).
A pair is a near duplicate when both distances are at most ``hash_threshold``; requiring both
keeps flat or low-texture images that agree on one hash from being paired.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from finegrain.checkpoint import write_csv_atomic, write_text_atomic
from finegrain.data.base import sha256_file


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` so that ``D @ x`` is the DCT of ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT32 = _dct_matrix(32)


def dhash(img: Image.Image, size: int = 8) -> np.ndarray:
    """Difference hash: ``size * size`` booleans, True where a pixel is brighter than its right neighbour."""
    g = np.asarray(img.convert("L").resize((size + 1, size), Image.LANCZOS), dtype=np.float32)
    return (g[:, 1:] > g[:, :-1]).flatten()


def phash(img: Image.Image) -> np.ndarray:
    """DCT hash: 64 booleans, the top-left 8x8 DCT coefficients (DC excluded from the median) above their median."""
    g = np.asarray(img.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    coeffs = (_DCT32 @ g @ _DCT32.T)[:8, :8].flatten()
    return coeffs > np.median(coeffs[1:])


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between boolean rows of ``a [N, K]`` and ``b [M, K]`` -> ``[N, M]`` int."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.rint(a @ (1 - b).T + (1 - a) @ b.T).astype(np.int32)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def _inspect(path: str) -> dict:
    """Hashes and size of one file, or its read error."""
    rec: dict = {"sha256": sha256_file(Path(path))}
    try:
        with Image.open(path) as im:
            im.verify()  # checks the container; load() below catches truncated pixel data
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001  (any decoder failure makes the file unreadable)
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["size"] = list(rgb.size)
    rec["dhash"], rec["phash"] = dhash(rgb), phash(rgb)
    return rec


def _open_splits(data, dataset):
    from finegrain.data.base import open_dataset

    splits = {"train": open_dataset(data, "train", dataset=dataset)}
    try:
        splits["test"] = open_dataset(data, "test", dataset=dataset)
    except (ValueError, FileNotFoundError):
        pass  # no test split: leaks cannot exist
    return splits


def _entries(splits: dict) -> list[dict]:
    """One record per (split, image), with its path, split, label, hashes and size (or read error)."""
    entries: list[dict] = []
    for split, images in splits.items():
        for p, l in zip(images.paths, images.labels):
            entries.append({"path": p, "split": split, "label": images.classes[l]})
    from finegrain.utils import progress_bar

    with progress_bar("check images", total=len(entries)) as bar:
        for e in entries:
            e.update(_inspect(e["path"]))
            bar.advance(1)
    return entries


def _is_tiny(size: list[int], min_side: int) -> bool:
    """Whether an image of ``size`` has a side shorter than ``min_side``."""
    return min(size) < min_side


def _is_extreme(size: list[int], max_aspect: float) -> bool:
    """Whether an image of ``size`` has a long/short side ratio above ``max_aspect``."""
    return max(size) / max(1, min(size)) > max_aspect


def _unreadable(entries: list[dict]) -> list[dict]:
    """The files that failed to decode, with their error."""
    return [{"path": e["path"], "split": e["split"], "error": e["error"]} for e in entries if "error" in e]


def _tiny(entries: list[dict], min_side: int) -> list[dict]:
    """The readable images with a side shorter than ``min_side``."""
    return [{"path": e["path"], "split": e["split"], "size": e["size"]} for e in entries
            if "size" in e and _is_tiny(e["size"], min_side)]


def _extreme_aspect(entries: list[dict], max_aspect: float) -> list[dict]:
    """The readable images whose long/short side ratio exceeds ``max_aspect``."""
    return [{"path": e["path"], "split": e["split"], "size": e["size"]} for e in entries
            if "size" in e and _is_extreme(e["size"], max_aspect)]


def _exact_duplicates(entries: list[dict]) -> list[list[int]]:
    """Groups of entry indices whose files have the same bytes (sha256)."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        by_sha[e["sha256"]].append(i)
    return [g for g in by_sha.values() if len(g) > 1]


def _near_duplicates(entries: list[dict], hash_threshold: int) -> list[tuple[int, int, int, int]]:
    """Pairs ``(a, b, dhash distance, phash distance)`` of readable files with different bytes and both hashes close."""
    ok = [i for i, e in enumerate(entries) if "dhash" in e]
    near_pairs: list[tuple[int, int, int, int]] = []
    if len(ok) > 1:
        d_all = np.stack([entries[i]["dhash"] for i in ok])
        p_all = np.stack([entries[i]["phash"] for i in ok])
        chunk = 1024  # bounds the [chunk, N] distance matrices
        for s in range(0, len(ok), chunk):
            dd = hamming_matrix(d_all[s:s + chunk], d_all)
            pd = hamming_matrix(p_all[s:s + chunk], p_all)
            rows, cols = np.nonzero((dd <= hash_threshold) & (pd <= hash_threshold))
            for r, c in zip(rows.tolist(), cols.tolist()):
                a, b = ok[s + r], ok[c]
                if a < b and entries[a]["sha256"] != entries[b]["sha256"]:
                    near_pairs.append((a, b, int(dd[r, c]), int(pd[r, c])))
    return near_pairs


def _duplicate_groups(n: int, exact_groups: list[list[int]], near_pairs: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Connected groups (sorted indices) of exact and near duplicates among ``n`` entries."""
    uf = _UnionFind(n)
    for g in exact_groups:
        for j in g[1:]:
            uf.union(g[0], j)
    for a, b, _, _ in near_pairs:
        uf.union(a, b)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _describe(entries: list[dict], i: int) -> dict:
    """Path, split and label of entry ``i``."""
    return {"path": entries[i]["path"], "split": entries[i]["split"], "label": entries[i]["label"]}


def _mixed_groups(entries: list[dict], dup_groups: list[list[int]], key: str) -> list[list[dict]]:
    """The duplicate groups whose members differ in ``key`` ("split": leaks, "label": label conflicts), described."""
    return [[_describe(entries, i) for i in g] for g in dup_groups if len({entries[i][key] for i in g}) > 1]


def _class_balance(splits: dict) -> tuple[dict[str, dict[str, int]], dict[str, float | None], dict[str, list[str]]]:
    """Per split: the image count of each class, the max/min ratio of non-empty classes, and the empty classes."""
    class_counts: dict[str, dict[str, int]] = {}
    imbalance: dict[str, float | None] = {}
    for split, images in splits.items():
        counts = dict(zip(images.classes, images.class_counts()))
        class_counts[split] = counts
        nonzero = [c for c in counts.values() if c > 0]
        imbalance[split] = (max(nonzero) / min(nonzero)) if nonzero else None
    empty_classes = {s: [c for c, n in cc.items() if n == 0] for s, cc in class_counts.items()}
    return class_counts, imbalance, empty_classes


def _flag_for_removal(entries: list[dict], dup_groups: list[list[int]], min_side: int, max_aspect: float) -> dict[int, str]:
    """The entries to leave out of a clean split, each with its reason."""
    drop: dict[int, str] = {}
    for i, e in enumerate(entries):
        if "error" in e:
            drop[i] = "unreadable"
        elif _is_tiny(e["size"], min_side):
            drop[i] = "tiny"
        elif _is_extreme(e["size"], max_aspect):
            drop[i] = "extreme aspect"
    for g in dup_groups:
        train = [i for i in g if entries[i]["split"] == "train"]
        keep = train[0] if train else g[0]  # a leaked test image goes; its train copy stays
        for i in g:
            if i != keep:
                drop.setdefault(i, "test copy of a train image" if entries[i]["split"] == "test" and train else "duplicate")
    return drop


def _report(data, settings: dict, splits: dict, entries: list[dict], *, unreadable: list[dict], tiny: list[dict],
            extreme: list[dict], exact_groups: list[list[int]], near_pairs: list[tuple[int, int, int, int]],
            leaks: list[list[dict]], label_conflicts: list[list[dict]], balance: tuple, drop: dict[int, str]) -> dict:
    """Assemble the report dict (summary first, then each check's findings) from the checks' results."""
    class_counts, imbalance, empty_classes = balance
    return {
        "data": str(data),
        "settings": settings,
        "summary": {
            "images": len(entries), "splits": {s: len(v) for s, v in splits.items()},
            "unreadable": len(unreadable), "exact_duplicate_groups": len(exact_groups),
            "near_duplicate_pairs": len(near_pairs), "leak_groups": len(leaks),
            "label_conflict_groups": len(label_conflicts), "tiny": len(tiny), "extreme_aspect": len(extreme),
            "imbalance": imbalance, "flagged_for_removal": len(drop),
        },
        "unreadable": unreadable,
        "exact_duplicates": [[_describe(entries, i) for i in g] for g in exact_groups],
        "near_duplicates": [{"a": _describe(entries, a), "b": _describe(entries, b), "dhash_distance": dd, "phash_distance": pd}
                            for a, b, dd, pd in near_pairs],
        "leaks": leaks,
        "label_conflicts": label_conflicts,
        "tiny": tiny,
        "extreme_aspect": extreme,
        "class_counts": class_counts,
        "empty_classes": empty_classes,
        "imbalance": imbalance,
        "removed_from_clean_split": [dict(_describe(entries, i), reason=r) for i, r in sorted(drop.items())],
    }


def _write_clean_split(clean_split: str | Path, entries: list[dict], drop: dict[int, str]) -> str:
    """Write the ``path,label,split`` CSV of the entries not in ``drop``; returns its resolved path."""
    dest = Path(clean_split).resolve()
    if str(dest) in {e["path"] for e in entries}:
        raise ValueError(f"--write-clean-split {dest} is one of the images; choose a new .csv path")
    write_csv_atomic(dest, [["path", "label", "split"],
                            *([e["path"], e["label"], e["split"]] for i, e in enumerate(entries) if i not in drop)])
    return str(dest)


def _write_reports(report: dict, out_dir: str | Path) -> str:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out / "report.md", _markdown(report))
    return str(out)


def check_data(
    data: str | Path,
    *,
    dataset: str | None = None,
    out_dir: str | Path | None = None,
    hash_threshold: int = 6,
    min_side: int = 64,
    max_aspect: float = 4.0,
    clean_split: str | Path | None = None,
) -> dict:
    """Check the train (and test, if any) split of ``data`` and write ``report.json`` + ``report.md``.

    Args:
        data: anything ``open_dataset`` reads (class folders, CSV, CUB root...).
        dataset: reader name; guessed from ``data`` if None.
        out_dir: folder for the reports; None writes nothing.
        hash_threshold: largest Hamming distance (of 64 bits, for both dHash and pHash) that
            counts as a near duplicate.
        min_side: images with a side shorter than this are flagged as tiny.
        max_aspect: images whose long/short side ratio exceeds this are flagged.
        clean_split: write a ``path,label,split`` CSV here without the flagged files: unreadable,
            tiny, extreme-aspect, every test image that duplicates a train image, and all but the
            first of each duplicate group within a split. Must lie outside the image folders'
            files (it never overwrites an image).

    Returns:
        The report dict (see ``report.json``): ``summary``, ``unreadable``, ``exact_duplicates``,
        ``near_duplicates``, ``leaks``, ``tiny``, ``extreme_aspect``, ``class_counts``, ``imbalance``.
    """
    if hash_threshold < 0 or hash_threshold > 64:
        raise ValueError(f"hash_threshold must be in 0..64, got {hash_threshold}")
    splits = _open_splits(data, dataset)
    entries = _entries(splits)
    exact_groups = _exact_duplicates(entries)
    near_pairs = _near_duplicates(entries, hash_threshold)
    dup_groups = _duplicate_groups(len(entries), exact_groups, near_pairs)
    drop = _flag_for_removal(entries, dup_groups, min_side, max_aspect)
    report = _report(
        data, {"hash_threshold": hash_threshold, "min_side": min_side, "max_aspect": max_aspect}, splits, entries,
        unreadable=_unreadable(entries), tiny=_tiny(entries, min_side), extreme=_extreme_aspect(entries, max_aspect),
        exact_groups=exact_groups, near_pairs=near_pairs, leaks=_mixed_groups(entries, dup_groups, "split"),
        label_conflicts=_mixed_groups(entries, dup_groups, "label"), balance=_class_balance(splits), drop=drop,
    )
    if clean_split is not None:
        report["clean_split"] = _write_clean_split(clean_split, entries, drop)
    if out_dir is not None:
        report["out_dir"] = _write_reports(report, out_dir)
    return report


def _markdown(r: dict, max_rows: int = 50) -> str:
    s = r["summary"]
    lines = [f"# Data check: {r['data']}", "",
             f"{s['images']} images ({', '.join(f'{k}: {v}' for k, v in s['splits'].items())}).", "",
             "| check | found |", "|---|---|"]
    for key, label in (("unreadable", "unreadable files"), ("exact_duplicate_groups", "exact duplicate groups"),
                       ("near_duplicate_pairs", "near-duplicate pairs"), ("leak_groups", "train/test leak groups"),
                       ("label_conflict_groups", "duplicates with different labels"), ("tiny", "tiny images"),
                       ("extreme_aspect", "extreme aspect ratio"), ("flagged_for_removal", "left out of a clean split")):
        lines.append(f"| {label} | {s[key]} |")
    for split, ratio in r["imbalance"].items():
        lines.append(f"| class imbalance ({split}, max/min) | {ratio:.2f} |" if ratio else f"| class imbalance ({split}) | n/a |")
    lines.append("")

    def section(title: str, rows: list[str]) -> None:
        if rows:
            lines.extend([f"## {title}", ""] + [f"- {x}" for x in rows[:max_rows]])
            if len(rows) > max_rows:
                lines.append(f"- ... {len(rows) - max_rows} more in report.json")
            lines.append("")

    section("Unreadable", [f"`{x['path']}` ({x['split']}): {x['error']}" for x in r["unreadable"]])
    section("Train/test leaks", [" = ".join(f"`{m['path']}` ({m['split']})" for m in g) for g in r["leaks"]])
    section("Exact duplicates", [" = ".join(f"`{m['path']}`" for m in g) for g in r["exact_duplicates"]])
    section("Near duplicates", [f"`{p['a']['path']}` ~ `{p['b']['path']}` (dHash {p['dhash_distance']}, pHash {p['phash_distance']})"
                                for p in r["near_duplicates"]])
    section("Duplicates with different labels", [" = ".join(f"`{m['path']}` ({m['label']})" for m in g) for g in r["label_conflicts"]])
    section("Tiny images", [f"`{x['path']}` {x['size'][0]}x{x['size'][1]}" for x in r["tiny"]])
    section("Extreme aspect ratio", [f"`{x['path']}` {x['size'][0]}x{x['size'][1]}" for x in r["extreme_aspect"]])
    lines += ["## Class counts", "", "| class | " + " | ".join(r["class_counts"]) + " |",
              "|---|" + "---|" * len(r["class_counts"])]
    names = list(next(iter(r["class_counts"].values())))
    for c in names:
        lines.append(f"| {c} | " + " | ".join(str(cc.get(c, 0)) for cc in r["class_counts"].values()) + " |")
    return "\n".join(lines) + "\n"

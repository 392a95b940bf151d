"""The reader registry, open_dataset and the layout guess."""

from __future__ import annotations

import pytest
import torchvision.datasets  # noqa: F401  (torch's import costs seconds: pay it at collection, not in a test)

import finegrain.data.benchmarks  # noqa: F401  (registers the benchmark readers)
from finegrain.data.base import DATASETS, open_dataset

from ..helpers import jpg, make_aircraft, make_cars, make_cub, make_dogs, make_flowers, make_nabirds, write


def test_every_reader_registered():
    assert {"folder", "csv", "cub", "nabirds", "dogs", "cars", "aircraft", "flowers102"} <= set(DATASETS.names())


@pytest.mark.parametrize("name", ["folder", "cub", "nabirds", "dogs", "cars", "aircraft", "flowers102"])
def test_bad_split_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="split must be one of"):
        DATASETS.get(name)(tmp_path, "validation")


def test_unknown_dataset_suggests_close_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cubb'.*Did you mean 'cub'"):
        open_dataset(tmp_path, dataset="cubb")


def test_open_dataset_autodetects(tmp_path):
    make_cub(tmp_path / "cub")
    assert open_dataset(tmp_path / "cub", "test").source.startswith("cub:")
    jpg(tmp_path / "flat" / "a" / "0.jpg")
    assert open_dataset(tmp_path / "flat").source.startswith("folder:")
    csv = write(tmp_path / "flat" / "list.csv", "path,label\na/0.jpg,a\n")
    assert open_dataset(csv).source.startswith("csv:")
    make_dogs(tmp_path / "dogs")
    assert open_dataset(tmp_path / "dogs", "test", dataset="dogs").classes[0] == "Chihuahua"


@pytest.mark.parametrize("name,make", [("cub", make_cub), ("nabirds", make_nabirds), ("dogs", make_dogs), ("cars", make_cars),
                                       ("aircraft", make_aircraft), ("flowers102", make_flowers)])
def test_each_benchmark_layout_is_recognised_by_its_own_reader(tmp_path, name, make):
    """The guess is a loop over the readers' own ``detect``: each benchmark as written by its maker, and its outer folder."""
    from finegrain.data.base import guess_reader

    base = make(tmp_path / name)
    for root in {base, tmp_path / name}:
        assert guess_reader(root) == name, root
    assert len(open_dataset(tmp_path / name, "train")) > 0


def test_unrecognised_path_says_so(tmp_path):
    from finegrain.data.base import guess_reader

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no reader recognises.*--dataset"):
        guess_reader(tmp_path / "notes.txt")

"""The stratified train/validation split."""

from finegrain.data.split import stratified_split


def test_stratified_split_per_class_fraction_disjoint_and_seeded():
    labels = [0] * 20 + [1] * 10 + [2] * 3 + [3] * 1
    tr, va = stratified_split(labels, 0.1, seed=1)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == list(range(len(labels)))
    val_counts = [sum(1 for i in va if labels[i] == c) for c in range(4)]
    assert val_counts == [2, 1, 1, 0]  # round(10%), at least one, none from a single-image class
    assert stratified_split(labels, 0.1, seed=1) == (tr, va)
    assert stratified_split(labels, 0.1, seed=2)[1] != va


def test_split_zero_fraction_keeps_everything_in_train():
    tr, va = stratified_split([0, 1, 1], 0.0, seed=0)
    assert tr == [0, 1, 2] and va == []

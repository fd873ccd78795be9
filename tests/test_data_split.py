"""Seeded sampling and group-aware splitting: deterministic, balanced, and no group straddles the split."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydicom.data import get_testdata_file

from medpfl.data import DicomSource, Item, sample_items, train_test_split
from medpfl.errors import MedPFLError


def _items(counts: dict[int, int], frames: int = 1) -> list[Item]:
    """Items of several classes; with frames > 1, consecutive items share a file (group)."""
    out = []
    for label, n in counts.items():
        for i in range(n):
            f = i // frames
            out.append(
                Item(f"c{label}/img{i:03d}", label, f"c{label}", provenance={"group": f"c{label}/file{f}"})
            )
    return out


def test_sample_is_deterministic_and_independent_of_listing_order() -> None:
    items = _items({0: 30, 1: 30, 2: 30})
    first = sample_items(items, 12, seed=7)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert [it.item_id for it in sample_items(shuffled, 12, seed=7)] == [it.item_id for it in first]
    assert [it.item_id for it in sample_items(items, 12, seed=8)] != [it.item_id for it in first]
    assert len({it.item_id for it in first}) == 12


def test_sample_balances_classes_and_redistributes_when_one_runs_out() -> None:
    items = _items({0: 50, 1: 50, 2: 3})
    picked = sample_items(items, 21, seed=0)
    assert Counter(it.label for it in picked) == {0: 9, 1: 9, 2: 3}
    even = sample_items(_items({0: 40, 1: 40, 2: 40}), 9, seed=3)
    assert Counter(it.label for it in even) == {0: 3, 1: 3, 2: 3}
    # Leftovers go one each to distinct classes.
    assert sorted(Counter(it.label for it in sample_items(_items({0: 9, 1: 9, 2: 9}), 8, seed=5)).values()) == [2, 3, 3]
    plain = sample_items(items, 21, seed=0, stratified=False)
    assert len(plain) == 21 and len({it.item_id for it in plain}) == 21
    assert sample_items(items, 0, seed=0) == []
    with pytest.raises(MedPFLError, match="only 103"):
        sample_items(items, 500, seed=0)


def test_split_keeps_groups_together_and_stratifies() -> None:
    items = _items({0: 60, 1: 40}, frames=4)  # 15 + 10 files of 4 frames each
    train, test = train_test_split(items, 0.2, seed=11)
    assert len(train) + len(test) == 100
    train_groups = {it.provenance["group"] for it in train}
    test_groups = {it.provenance["group"] for it in test}
    assert not train_groups & test_groups
    per_class = Counter(it.label for it in test)
    assert per_class == {0: 12, 1: 8}  # 20% of each class, in whole files
    again = train_test_split(list(reversed(items)), 0.2, seed=11)
    assert [it.item_id for it in again[1]] == [it.item_id for it in test]
    other = train_test_split(items, 0.2, seed=12)[1]
    assert {it.item_id for it in other} != {it.item_id for it in test}


def test_split_without_group_key_treats_items_alone_and_rejects_bad_fraction() -> None:
    items = [Item(f"x{i:02d}", i % 2, str(i % 2)) for i in range(20)]
    train, test = train_test_split(items, 0.25, seed=0)
    assert Counter(it.label for it in test) == {0: 2, 1: 2}  # 2.5 per class rounds to whole items
    assert not {it.item_id for it in train} & {it.item_id for it in test}
    # A class with two items still gets one into each side.
    tiny = [Item("a0", 0, "a"), Item("a1", 0, "a")] + [Item(f"b{i}", 1, "b") for i in range(10)]
    tr, te = train_test_split(tiny, 0.1, seed=0)
    assert sum(it.label == 0 for it in te) == 1 and sum(it.label == 0 for it in tr) == 1
    # A large test fraction still leaves every class one group to train on.
    tr, te = train_test_split(_items({0: 8, 1: 8}, frames=4), 0.9, seed=0)
    assert Counter(it.label for it in tr) == {0: 4, 1: 4} and Counter(it.label for it in te) == {0: 4, 1: 4}
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(MedPFLError, match="test_fraction"):
            train_test_split(items, bad, seed=0)


def test_multiframe_dicom_frames_never_straddle_the_split(tmp_path) -> None:
    import shutil

    (tmp_path / "us").mkdir()
    (tmp_path / "mr").mkdir()
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), tmp_path / "us" / "cine1.dcm")
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), tmp_path / "us" / "cine2.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "mr" / "emri1.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "mr" / "emri2.dcm")
    src = DicomSource(tmp_path)
    assert len(src.items) == 30 * 2 + 10 * 2
    train, test = train_test_split(src.items, 0.5, seed=0)
    for side in (train, test):
        files = Counter(it.provenance["path"] for it in side)
        assert all(n == (30 if "cine" in p else 10) for p, n in files.items())
    assert {it.class_name for it in test} == {"us", "mr"}

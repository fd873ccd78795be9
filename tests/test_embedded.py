"""The embedded real-image dataset: size, provenance, determinism, grouped split, cache reuse."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medpfl.data import embedded as emb
from medpfl.errors import MedPFLError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emb.ensure_embedded(tmp_path_factory.mktemp("cache"))


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "embedded-v1.npz") as z:
        return {k: z[k] for k in z.files}


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "embedded-v1-provenance.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_size_classes_and_values(built: Path) -> None:
    z = _arrays(built)
    images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (64, 64, 3)
    assert len(images) >= 600 and len(labels) == len(images)
    assert list(z["class_names"]) == list(emb.CLASSES) and len(emb.CLASSES) >= 6
    counts = Counter(labels.tolist())
    assert set(counts) == set(range(len(emb.CLASSES)))
    assert min(counts.values()) >= 60 and max(counts.values()) <= 2 * min(counts.values())
    # Every crop passed the content check, so none is a flat background patch.
    assert images.reshape(len(images), -1).std(axis=1).min() > 4.0
    assert len(set(z["item_ids"].tolist())) == len(images)


def test_provenance_complete(built: Path) -> None:
    z = _arrays(built)
    rows = _rows(built)
    assert [r["item_id"] for r in rows] == z["item_ids"].tolist()
    assert [int(r["label"]) for r in rows] == z["labels"].tolist()
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    for r in rows:
        for key in ("item_id", "class", "package", "version", "file", "origin", "crop_box", "region", "licence",
                    "group", "split"):
            assert r[key], f"{key} empty for {r['item_id']}"
        assert r["version"] != "unknown"
        assert "/" not in r["file"] and "\\" not in r["file"], "file must be a bare name, not a path"
        assert r["group"].startswith(r["file"])
        assert "GPL" not in r["licence"].upper()
        x0, y0, x1, y1 = map(int, r["crop_box"].split(","))
        rx0, ry0, rx1, ry1 = map(int, r["region"].split(","))
        assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1 and x1 - x0 == y1 - y0
        assert emb.CLASSES[int(r["label"])] == r["class"]
    # Multi-frame and volume sources record which frame or slice each crop came from.
    for r in rows:
        if r["file"] in ("emri_small.dcm", "examples_ybr_color.dcm", "example4d.nii.gz"):
            assert r["frame"]
    readme = (built / "embedded-v1-README.txt").read_text(encoding="utf-8")
    for file in {r["file"] for r in rows}:
        assert file in readme


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    again = emb.ensure_embedded(tmp_path)
    first = json.loads((built / "embedded-v1.json").read_text())["sha256"]
    second = json.loads((again / "embedded-v1.json").read_text())["sha256"]
    assert first == second
    a, b = _arrays(built), _arrays(again)
    assert hashlib.sha256(a["images"].tobytes()).digest() == hashlib.sha256(b["images"].tobytes()).digest()
    assert (built / "embedded-v1-provenance.csv").read_bytes() == (again / "embedded-v1-provenance.csv").read_bytes()


def test_recommended_split_keeps_groups_together(built: Path) -> None:
    rows = _rows(built)
    sides: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        sides[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in sides.values()), {g: s for g, s in sides.items() if len(s) > 1}
    by_split = Counter((r["class"], r["split"]) for r in rows)
    for cls in emb.CLASSES:
        n_test, n_train = by_split[(cls, "test")], by_split[(cls, "train")]
        assert n_test > 0 and n_train > 0, cls
        assert 0.15 <= n_test / (n_test + n_train) <= 0.4, cls


def test_no_test_image_duplicates_a_train_image(built: Path) -> None:
    z = _arrays(built)
    split = np.array([r["split"] for r in _rows(built)])
    flat = z["images"].reshape(len(split), -1).astype(np.float64) / 255.0
    train, test = flat[split == "train"], flat[split == "test"]
    train_hashes = {hashlib.sha1(x.tobytes()).digest() for x in train}
    assert not any(hashlib.sha1(x.tobytes()).digest() in train_hashes for x in test)
    # Near-duplicates too: neighbouring cine frames sit about 0.01 RMS apart, so 0.03 would catch a leaked run.
    d2 = (test**2).sum(1)[:, None] + (train**2).sum(1)[None, :] - 2.0 * test @ train.T
    rms = np.sqrt(np.maximum(d2, 0.0) / flat.shape[1])
    assert rms.min() > 0.03


def test_second_call_reuses_cache(built: Path) -> None:
    paths = [built / n for n in ("embedded-v1.npz", "embedded-v1-provenance.csv", "embedded-v1.json")]
    before = [p.stat().st_mtime_ns for p in paths]
    assert emb.ensure_embedded(built.parent) == built
    emb.describe_embedded(built.parent)
    assert [p.stat().st_mtime_ns for p in paths] == before


def test_stale_or_corrupt_cache_is_rebuilt(built: Path, tmp_path: Path) -> None:
    folder = tmp_path / "embedded"
    shutil.copytree(built, folder)
    marker = folder / "embedded-v1.json"
    data = json.loads(marker.read_text())
    data["builder_version"] = "0.old"
    marker.write_text(json.dumps(data))
    assert emb.ensure_embedded(tmp_path) == folder
    assert json.loads(marker.read_text()) == json.loads((built / "embedded-v1.json").read_text())
    # A marker that matches the version but not the data (a truncated CSV) also forces a rebuild.
    csv_path = folder / "embedded-v1-provenance.csv"
    csv_path.write_text(csv_path.read_text()[:-200])
    emb.ensure_embedded(tmp_path)
    assert csv_path.read_bytes() == (built / "embedded-v1-provenance.csv").read_bytes()
    assert not list(folder.glob(".*.tmp")), "temp files left behind"


def test_embedded_source_splits_and_load(built: Path) -> None:
    all_ = emb.embedded_source(built.parent)
    train = emb.embedded_source(built.parent, split="train")
    test = emb.embedded_source(built.parent, split="test")
    assert len(all_) == len(train) + len(test) == len(_rows(built))
    assert {i.item_id for i in train.items}.isdisjoint(i.item_id for i in test.items)
    assert all_.classes == list(emb.CLASSES)
    assert {i.class_name for i in test.items} == set(emb.CLASSES)
    images = _arrays(built)["images"]
    for item in test.items[:: max(1, len(test) // 20)]:
        x = test.load(item)
        assert x.dtype == np.float32 and x.shape == (64, 64, 3)
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(x, images[int(item.provenance["index"])].astype(np.float32) / 255.0)
        assert item.provenance["split"] == "test" and item.provenance["group"]
    # Item ids are stable across instances.
    assert [i.item_id for i in emb.embedded_source(built.parent).items] == [i.item_id for i in all_.items]
    with pytest.raises(MedPFLError, match="split"):
        emb.embedded_source(built.parent, split="validation")
    with pytest.raises(MedPFLError):
        train.load(test.items[0])


def test_describe_embedded(built: Path) -> None:
    info = emb.describe_embedded(built.parent)
    assert info["path"] == str(built)
    assert info["n_images"] == sum(info["per_class"].values()) == sum(info["licences"].values())
    assert sum(info["per_split"].values()) == info["n_images"]
    assert info["size"] == [64, 64, 3]
    assert set(info["per_class"]) == set(emb.CLASSES)
    assert len(info["sha256"]) == 64


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDPFL_CACHE", str(tmp_path / "env"))
    assert emb.embedded_dir() == tmp_path / "env" / "embedded"
    assert emb.embedded_dir(tmp_path / "arg") == tmp_path / "arg" / "embedded"
    monkeypatch.delenv("MEDPFL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert emb.embedded_dir() == tmp_path / "home" / ".cache" / "medpfl" / "embedded"


def test_unwritable_cache_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MedPFLError, match="MEDPFL_CACHE"):
        emb.ensure_embedded(blocker)

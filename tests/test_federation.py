"""Sites, held-out test set, aggregation and utility metrics of a federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpfl.data.base import Item
from medpfl.data.embedded import embedded_source
from medpfl.errors import MedPFLError
from medpfl.fl.aggregate import apply_update, weighted_average
from medpfl.fl.partition import federate, held_out_split, keep_per_site, partition_items
from medpfl.seeds import site_order
from medpfl.fl.utility import balanced_accuracy, binary_auc, chance_levels, macro_auc


@pytest.fixture(scope="module")
def source():
    return embedded_source()


def _ids(sites):
    return [[it.item_id for it in site] for site in sites]


def test_embedded_federation_uses_the_recommended_split_and_covers_every_training_image(source):
    fed = federate(source, 5, "iid", seed=3)
    test_ids = {it.item_id for it in fed.test}
    assert test_ids == {it.item_id for it in source.items if it.provenance["split"] == "test"}
    train_ids = [i for site in fed.sites for i in _ids([site])[0]]
    assert len(train_ids) == len(set(train_ids)) == len(source.items) - len(test_ids)
    assert max(fed.n_images) - min(fed.n_images) <= 1
    assert _ids(federate(source, 5, "iid", seed=3).sites) == _ids(fed.sites)
    assert _ids(federate(source, 5, "iid", seed=4).sites) != _ids(fed.sites)


def test_dirichlet_skews_labels_and_by_column_gives_one_site_per_value(source):
    iid = np.array(federate(source, 5, "iid", seed=0).label_counts(), float)
    skewed = np.array(federate(source, 5, "dirichlet:0.3", seed=0).label_counts(), float)
    share = lambda c: (c / c.sum(1, keepdims=True)).max(1).mean()  # noqa: E731  dominant class share per site
    assert share(skewed) > share(iid) + 0.2
    by_class = federate(source, 6, "by:class", seed=0)
    assert all(len({it.class_name for it in site}) == 1 for site in by_class.sites)
    merged = federate(source, 3, "by:class", seed=0)  # fewer sites than classes: classes merged, none split
    assert sorted(len({it.class_name for it in s}) for s in merged.sites) == [2, 2, 2]


def test_grouped_split_for_sources_without_a_recommended_one():
    items = [Item(f"f{g}#{k}", g % 3, f"c{g % 3}", {"group": f"file{g}"}) for g in range(30) for k in range(4)]
    train, test = held_out_split(items, seed=0)
    assert {it.provenance["group"] for it in train}.isdisjoint({it.provenance["group"] for it in test})
    assert 0.15 < len(test) / len(items) < 0.35 and {it.label for it in test} == {0, 1, 2}


@pytest.mark.parametrize("sites, partition, words", [
    (5, "random", "Unknown --partition 'random'"),
    (5, "dirichlet:-1", "ALPHA must be a positive"),
    (5, "by:scanner", "choose one of"),
    (7, "by:class", "--sites 6 or fewer"),
    (600, "iid", "--sites 600 is more than the 541 training images"),
])
def test_bad_federations_are_refused_in_one_sentence(source, sites, partition, words):
    with pytest.raises(MedPFLError, match=words.replace("(", r"\(")):
        federate(source, sites, partition, seed=0)


def test_a_class_without_training_images_is_named(source):
    class OneClassLess:
        classes = source.classes
        items = [it for it in source.items if not (it.class_name == "MR" and it.provenance["split"] == "train")]
    with pytest.raises(MedPFLError, match="Class 'MR' has no training images"):
        federate(OneClassLess, 5, "iid", seed=0)


def test_partition_does_not_depend_on_listing_order(source):
    items = list(source.items[:100])
    forward = partition_items(items, 4, "dirichlet:0.5", 1)
    backward = partition_items(items[::-1], 4, "dirichlet:0.5", 1)
    assert _ids(forward) == _ids(backward)


def test_site_order_is_a_fixed_permutation_per_round_and_site():
    assert sorted(site_order(0, 1, 2, 10)) == list(range(10))
    assert (site_order(0, 1, 2, 10) == site_order(0, 1, 2, 10)).all()
    assert not (site_order(0, 1, 2, 10) == site_order(0, 2, 2, 10)).all()


def test_weighted_average_weighs_sites_by_images_and_fedsgd_steps_against_it():
    updates = {"w": torch.tensor([[1.0, 0.0], [4.0, 3.0]])}
    avg = weighted_average(updates, [3, 1])
    torch.testing.assert_close(avg["w"], torch.tensor([1.75, 0.75]))
    w = {"w": torch.ones(2)}
    torch.testing.assert_close(apply_update(w, avg, "fedsgd", 0.1)["w"], torch.tensor([0.825, 0.925]))
    torch.testing.assert_close(apply_update(w, avg, "fedavg", 0.1)["w"], torch.tensor([2.75, 1.75]))
    with pytest.raises(MedPFLError):
        weighted_average(updates, [1, 2, 3])


def test_auc_is_the_share_of_correctly_ordered_pairs_with_ties_counting_half():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    positive = np.array([False, False, True, True, True])
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert binary_auc(scores, positive) == pytest.approx(expected)
    perfect = np.eye(3)[[0, 1, 2, 2]]
    assert macro_auc(perfect, np.array([0, 1, 2, 2])) == 1.0
    assert macro_auc(1 - perfect, np.array([0, 1, 2, 2])) == 0.0


def test_balanced_accuracy_and_chance_levels():
    labels = np.array([0, 0, 0, 1])
    always_zero = np.tile([1.0, 0.0], (4, 1))
    assert balanced_accuracy(always_zero, labels) == 0.5
    assert chance_levels(labels, 3) == {"accuracy": 0.75, "balanced_accuracy": 0.5, "auc": 0.5}


def test_site_images_keeps_a_seeded_draw_of_each_sites_own_images(source):
    federation = federate(source, 3, "iid", 0)
    kept = keep_per_site(federation, 2, 0)
    assert kept.n_images == [2, 2, 2] and kept == keep_per_site(federation, 2, 0)
    assert all(set(k) <= set(s) for k, s in zip(kept.sites, federation.sites)) and kept.test == federation.test
    # Runs of several seeds (one image per site each) attack different images, not the set's lowest ids again.
    drawn = [it.item_id for seed in range(4) for site in keep_per_site(federate(source, 2, "iid", seed), 1, seed).sites
             for it in site]
    assert len(set(drawn)) == len(drawn) == 8
    with pytest.raises(MedPFLError, match="--site-images -1 is invalid"):
        keep_per_site(federation, -1, 0)

"""Sites of a federation: a held-out test set, and the training items split over N sites.

Partitions: `iid` (a seeded shuffle dealt into near-equal shares), `dirichlet:ALPHA` (non-IID by label:
each class is split over the sites in Dirichlet(ALPHA) proportions; small ALPHA, few classes per site),
`by:COLUMN` (one site per value of a provenance column, e.g. `by:class`, a scanner or a hospital).
Everything is a function of the items and the seed, never of the order a file system listed them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medpfl.data.base import ImageSource, Item
from medpfl.data.split import train_test_split
from medpfl.errors import MedPFLError
from medpfl.seeds import PARTITION, rng

PARTITION_HELP = "iid, dirichlet:ALPHA (e.g. dirichlet:0.3) or by:COLUMN (e.g. by:class)"
TEST_FRACTION = 0.25  # for sources without a recommended split: close to the embedded set's own (185 of 726)
_DIRICHLET_TRIES = 1000  # redraws until every site holds an image; more means ALPHA is too small for N sites


@dataclass(frozen=True)
class Federation:
    """The training items of each site and the held-out test items (never seen by any site)."""

    sites: tuple[tuple[Item, ...], ...]
    test: tuple[Item, ...]
    classes: tuple[str, ...]
    partition: str

    @property
    def n_images(self) -> list[int]:
        """Training images per site."""
        return [len(site) for site in self.sites]

    def label_counts(self) -> list[list[int]]:
        """Images of each class (columns) at each site (rows)."""
        return [[sum(it.label == k for it in site) for k in range(len(self.classes))] for site in self.sites]


def _by_id(items: Sequence[Item]) -> list[Item]:
    return sorted(items, key=lambda it: it.item_id)


def held_out_split(items: Sequence[Item], seed: int,
                   test_fraction: float = TEST_FRACTION) -> tuple[list[Item], list[Item]]:
    """(train, test): the source's own recommended split when its items carry one (the embedded set's
    `split` column), else a label-stratified split that keeps each `group` (file, volume) on one side."""
    marks = {it.provenance.get("split") for it in items}
    if marks == {"train", "test"}:
        return (_by_id([it for it in items if it.provenance["split"] == "train"]),
                _by_id([it for it in items if it.provenance["split"] == "test"]))
    return train_test_split(items, test_fraction, seed)


def _column(item: Item, column: str) -> str | None:
    if column in item.provenance:
        return str(item.provenance[column])
    return {"class": item.class_name, "label": str(item.label)}.get(column)


def _iid(items: list[Item], n_sites: int, gen: np.random.Generator) -> list[list[Item]]:
    order = gen.permutation(len(items))
    return [[items[i] for i in share] for share in np.array_split(order, n_sites)]


def _dirichlet(items: list[Item], n_sites: int, alpha: float, gen: np.random.Generator) -> list[list[Item]]:
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    for _ in range(_DIRICHLET_TRIES):
        sites: list[list[Item]] = [[] for _ in range(n_sites)]
        for label in sorted(by_label):
            members = [by_label[label][i] for i in gen.permutation(len(by_label[label]))]
            shares = gen.dirichlet(np.full(n_sites, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, part in enumerate(np.split(np.arange(len(members)), cuts)):
                sites[site].extend(members[i] for i in part)
        if all(sites):
            return sites
    raise MedPFLError(f"--partition dirichlet:{alpha} leaves a site without images for {n_sites} sites and "
                      f"{len(items)} images; raise ALPHA or lower --sites.")


def _by_column(items: list[Item], n_sites: int, column: str) -> list[list[Item]]:
    values: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        value = _column(it, column)
        if value is None:
            common = set.intersection(*(set(i.provenance) for i in items)) | {"class", "label"}
            raise MedPFLError(f"--partition by:{column} names a column the data does not have; "
                              f"choose one of: {', '.join(sorted(common))}.")
        values[value].append(it)
    if n_sites > len(values):
        raise MedPFLError(f"--partition by:{column} gives at most {len(values)} sites (one per value of "
                          f"'{column}'); pass --sites {len(values)} or fewer.")
    # More values than sites: the largest remaining value joins the currently smallest site.
    sites: list[list[Item]] = [[] for _ in range(n_sites)]
    for value in sorted(values, key=lambda v: (-len(values[v]), v)):
        smallest = min(range(n_sites), key=lambda s: (len(sites[s]), s))
        sites[smallest].extend(values[value])
    return sites


def partition_items(items: Sequence[Item], n_sites: int, partition: str, seed: int) -> list[list[Item]]:
    """Split `items` over `n_sites` sites as `partition` says; the same seed gives the same sites."""
    if n_sites < 1:
        raise MedPFLError(f"--sites {n_sites} is invalid; federate over 1 or more sites.")
    if n_sites > len(items):
        raise MedPFLError(f"--sites {n_sites} is more than the {len(items)} training images; lower --sites "
                          "or add images.")
    ordered = _by_id(items)
    gen = rng(seed, PARTITION, 1)
    kind, arg = parse_partition(partition)
    if kind == "iid":
        sites = _iid(ordered, n_sites, gen)
    elif kind == "dirichlet":
        sites = _dirichlet(ordered, n_sites, float(arg), gen)
    else:
        sites = _by_column(ordered, n_sites, arg)
    return [_by_id(site) for site in sites]


def parse_partition(partition: str) -> tuple[str, str]:
    """('iid', ''), ('dirichlet', ALPHA) or ('by', COLUMN); a bad spec raises naming --partition, before any data."""
    kind, _, arg = partition.partition(":")
    if kind == "dirichlet" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise MedPFLError(f"--partition {partition}: ALPHA must be a positive number, e.g. dirichlet:0.3.")
    elif not ((kind == "iid" and not arg) or (kind == "by" and arg)):
        raise MedPFLError(f"Unknown --partition '{partition}'; use {PARTITION_HELP}.")
    return kind, arg


def federate(source: ImageSource, n_sites: int, partition: str = "iid", seed: int = 0,
             test_fraction: float = TEST_FRACTION) -> Federation:
    """Hold out a test set from `source`, then split the rest over `n_sites` sites by `partition`."""
    train, test = held_out_split(source.items, int(rng(seed, PARTITION, 0).integers(2**31)), test_fraction)
    if not test:
        # The split keeps one file (volume) of every class for training, so a class needs two to spare one.
        raise MedPFLError(f"The data ({len(source.items)} images) leaves no image for the held-out test set: "
                          "no class has images from two or more files; add images so that a class has at least 2.")
    present = Counter(it.label for it in train)
    missing = [name for k, name in enumerate(source.classes) if present[k] == 0]
    if missing:
        raise MedPFLError(f"Class '{missing[0]}' has no training images once the test set is held out; "
                          "add images of it or remove it from the data.")
    sites = partition_items(train, n_sites, partition, seed)
    return Federation(tuple(tuple(s) for s in sites), tuple(test), tuple(source.classes), partition)


def keep_per_site(federation: Federation, n_images: int, seed: int) -> Federation:
    """The federation with at most `n_images` of each site's images, a seeded draw from its share (0: all).

    A draw, not the first by item id: those would repeat from seed to seed (the lowest id of the whole
    set is always some site's first), and runs of several seeds would share images."""
    if n_images < 0:
        raise MedPFLError(f"--site-images {n_images} is invalid; keep 1 or more images per site, or 0 for all.")
    sites = []
    for s, site in enumerate(federation.sites):
        if not n_images or n_images >= len(site):
            sites.append(site)
            continue
        chosen = rng(seed, PARTITION, 2, s).choice(len(site), n_images, replace=False)
        sites.append(tuple(site[i] for i in sorted(chosen)))
    return Federation(tuple(sites), federation.test, federation.classes, federation.partition)

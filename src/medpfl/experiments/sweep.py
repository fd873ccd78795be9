"""A grid of attack x defense x strength x seed: privacy from attack runs, utility from federated training.

Run directory: config.json; results.jsonl (one line per finished cell: kind "privacy" for an attack on
the defended update, kind "utility" for a federation trained with the defense in every round);
cells/<name>/ (each cell's own run directory, which itself resumes); tradeoff.csv and tradeoff.png.
Cells run in parallel worker processes (or on a Ray cluster); the driver alone writes results.jsonl,
so a killed sweep loses only unfinished cells, and the same command finishes the grid.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from medpfl.defenses import Chain, parse_defense, parse_defenses
from medpfl.errors import MedPFLError
from medpfl.experiments.run_dir import append_result, open_run_dir, read_results, write_json


@dataclass
class SweepConfig:
    """Everything that determines a sweep's results."""

    attacks: list[str] = field(default_factory=lambda: ["idlg", "invgrad"])
    defenses: list[str] = field(default_factory=lambda: ["none"])  # specs, each with lists of strengths
    data: str | None = None  # None: the embedded real-image set
    n_images: int = 16  # images attacked per cell, the same images in every cell of a seed
    seeds: int | list[int] = 1  # how many (seeds 0, 1, ...), or which
    image_size: int = 32
    channels: int = 3
    # GroupNorm: DP-SGD needs per-example gradients, which BatchNorm entangles; the LeNets have no norm.
    norm: str = "group"
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"invgrad": {"steps": 200}}
    models: dict[str, str] = field(default_factory=dict)  # the model each attack runs on; default: the paper's
    # The threat (as medpfl attack's options): images behind each site's update, label access, BatchNorm mode.
    batch_size: int = 1
    labels: str | None = None
    bn_mode: str | None = None
    utility: bool = True  # train a federation per defense and seed (needs medpfl.fl's engine)
    rounds: int = 20
    sites: int = 5
    device: str = "cpu"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def chains(self) -> list[Chain]:
        """Every defense chain the specs name, in order, without repeats; DP-SGD on the training's schedule."""
        seen: dict[str, Chain] = {}
        for spec in self.defenses:
            for chain in parse_defenses(spec):
                chain = self._on_training_schedule(chain)
                seen.setdefault(chain.label(), chain)
        return list(seen.values())

    def _on_training_schedule(self, chain: Chain) -> Chain:
        """DP-SGD calibrated over the federation's schedule, so the attacked step has the trained noise;
        client-level DP accounted over the federation's rounds."""
        if chain.server is not None:
            chain = Chain(tuple(replace(d, rounds=self.rounds) if d.stage == "server" else d for d in chain.defenses))
        if chain.local is None:
            return chain
        from medpfl.data import open_verified
        from medpfl.defenses.dpsgd import dp_schedules
        from medpfl.experiments.defended_training import TRAINING
        from medpfl.fl.partition import federate

        n_images = federate(open_verified(self.data)[0], self.sites, "iid", 0).n_images
        worst = chain.local.for_sites(dp_schedules(n_images, TRAINING, self.rounds))
        return Chain(tuple(replace(d, sample_rate=round(worst.sample_rate, 6), steps=worst.steps)
                           if d.stage == "local" else d for d in chain.defenses))


def load_sweep_config(file: str | Path) -> dict[str, Any]:
    """Sweep settings from a YAML or JSON file (keys: the fields of SweepConfig); one sentence if it is wrong."""
    import json

    path = Path(file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MedPFLError(f"Cannot read the sweep config '{path}' ({exc.strerror}).") from None
    try:
        if path.suffix == ".json":
            fields = json.loads(text)
        else:
            import yaml

            fields = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001  (any parse error is the user's file)
        raise MedPFLError(f"The sweep config '{path}' is not valid YAML/JSON ({type(exc).__name__}).") from None
    known = SweepConfig.__dataclass_fields__
    unknown = [k for k in fields or {} if k not in known] if isinstance(fields, dict) else ["(not a mapping)"]
    if unknown:
        raise MedPFLError(f"The sweep config '{path}' has unknown key '{unknown[0]}'; valid keys: {', '.join(known)}.")
    return dict(fields)


def cell_name(kind: str, defense: str, seed: int, attack: str | None = None) -> str:
    """A cell's key in results.jsonl and its folder name under cells/."""
    safe = re.sub(r"[^A-Za-z0-9.=,+-]", "_", defense.replace(":", "-"))
    return f"{kind}-{attack + '-' if attack else ''}{safe}-seed{seed}"


def plan(config: SweepConfig) -> list[dict[str, Any]]:
    """Every job of the grid: utility jobs first (slowest), then privacy jobs."""
    from medpfl.attacks import ATTACKS

    bad = [a for a in config.attacks if a not in ATTACKS]
    if bad or not config.attacks:
        raise MedPFLError(f"--attacks '{','.join(bad or config.attacks)}' names no known attack; "
                          f"choose from: {', '.join(ATTACKS)}.")
    if config.n_images < 1 or not config.seed_list:
        raise MedPFLError(f"--n-images ({config.n_images}) and --seeds ({config.seeds}) must be 1 or more.")
    chains = config.chains()
    jobs = []
    for seed in config.seed_list:
        if config.utility:
            for label in dict.fromkeys(_trained_label(c) for c in chains):
                jobs.append({"kind": "utility", "defense": label, "seed": seed})
        for attack in config.attacks:
            for chain in chains:
                jobs.append({"kind": "privacy", "attack": attack, "defense": chain.label(), "seed": seed})
    for job in jobs:
        job["cell"] = cell_name(job["kind"], job["defense"], job["seed"], job.get("attack"))
    return jobs


def _trained_label(chain: Chain) -> str:
    """The defense a federation trains with: secure aggregation leaves the aggregate, hence training, unchanged."""
    return Chain(tuple(d for d in chain.defenses if d.stage != "channel")).label()


def run_cell(job: dict[str, Any], config: dict[str, Any], out: str) -> dict[str, Any]:
    """Run one job of the grid into out/cells/<cell>/ and return its result line (a worker's entry point)."""
    sweep = SweepConfig(**config)
    started = time.perf_counter()
    path = Path(out) / "cells" / job["cell"]
    if job["kind"] == "privacy":
        result = _privacy(job, sweep, path)
    else:
        result = _utility(job, sweep, path)
    return {**job, **result, "cell_seconds": time.perf_counter() - started}


def _privacy(job: dict[str, Any], sweep: SweepConfig, path: Path) -> dict[str, Any]:
    from medpfl.experiments.attack_run import AttackRunConfig, run_attack

    settings = dict(sweep.attack_settings.get(job["attack"], {}))
    config = AttackRunConfig(attack=job["attack"], data=sweep.data, model=sweep.models.get(job["attack"]),
                             image_size=sweep.image_size, channels=sweep.channels, batch_size=sweep.batch_size,
                             n_images=sweep.n_images * parse_defense(job["defense"]).sites_per_update,
                             seed=job["seed"], norm=sweep.norm, device=sweep.device, settings=settings,
                             labels=sweep.labels, bn_mode=sweep.bn_mode, defense=job["defense"])
    summary = run_attack(config, path)
    keys = ("n_images", "images_per_update", "asr", "asr_chance", "success_ssim", "mean_ssim", "median_ssim",
            "mean_psnr", "mean_mse", "label_accuracy", "label_chance", "reid_rate", "reid_chance", "seconds_per_image",
            "epsilon", "model", "num_classes")
    chain = parse_defense(job["defense"]).calibrated()
    return {**{k: summary[k] for k in keys}, "delta": chain.local.delta if chain.local else None}


def _utility(job: dict[str, Any], sweep: SweepConfig, path: Path) -> dict[str, Any]:
    try:
        from medpfl.experiments.defended_training import train_with_defense
    except ImportError:
        return {"utility": "pending"}
    return train_with_defense(parse_defense(job["defense"]), sweep, job["seed"], path)


def _limit_threads(threads: int) -> None:
    """Each worker gets its share of the cores: oversubscribed BLAS threads made one attack ~17x slower here."""
    import torch

    torch.set_num_threads(threads)


def run_sweep(config: SweepConfig, out: str | Path, workers: int | None = None, ray_address: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the grid into `out`; returns the trade-off rows also written to tradeoff.csv/.png."""
    jobs = plan(config)
    path = open_run_dir(out, asdict(config))
    done = {r["cell"] for r in read_results(path)}
    todo = [j for j in jobs if j["cell"] not in done]
    if progress:
        progress(len(jobs) - len(todo), len(jobs))
    record = asdict(config)

    def finished(result: dict[str, Any]) -> None:
        append_result(path, result)
        done.add(result["cell"])
        if progress:
            progress(len(done & {j["cell"] for j in jobs}), len(jobs))

    if ray_address:
        _run_on_ray(todo, record, str(path), ray_address, finished)
    else:
        workers = workers or min(len(todo), os.cpu_count() or 1) or 1
        if workers == 1:
            for job in todo:
                finished(run_cell(job, record, str(path)))
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_limit_threads, initargs=(threads,)) as pool:
                pending = {pool.submit(run_cell, job, record, str(path)) for job in todo}
                while pending:
                    complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in complete:
                        finished(future.result())
    return write_tradeoff(path, [j["cell"] for j in jobs])


def _run_on_ray(todo: list[dict[str, Any]], record: dict[str, Any], out: str, address: str,
                finished: Callable[[dict[str, Any]], None]) -> None:
    """Run the jobs as Ray tasks on the cluster at `address` (whose nodes see `out` at the same path)."""
    try:
        import ray
    except ImportError:
        raise MedPFLError("--ray needs Ray; install it with pip install 'flwr[simulation]' or pip install ray.") \
            from None
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_cell)
    pending = [remote.remote(job, record, out) for job in todo]
    while pending:
        complete, pending = ray.wait(pending, num_returns=1)
        for ref in complete:
            finished(ray.get(ref))


def write_tradeoff(path: Path, order: list[str] | None = None) -> list[dict[str, Any]]:
    """tradeoff.csv and tradeoff.png from the finished cells of a sweep directory (rows in the grid's `order`)."""
    from medpfl.report.tradeoff import plot_tradeoff, tradeoff_rows, write_csv

    rank = {cell: i for i, cell in enumerate(order or [])}
    results = sorted(read_results(path), key=lambda r: rank.get(r["cell"], len(rank)))
    privacy = [r for r in results if r["kind"] == "privacy"]
    utility = [r for r in results if r["kind"] == "utility" and r.get("utility") != "pending"]
    for p in privacy:  # a federation under secure aggregation trains as without it
        p["trained_as"] = _trained_label(parse_defense(p["defense"]))
    rows = tradeoff_rows(privacy, utility)
    write_csv(rows, path / "tradeoff.csv")
    if rows:
        plot_tradeoff(rows, path / "tradeoff.png")
    write_json(path / "summary.json", {"cells": len(results), "rows": rows})
    return rows

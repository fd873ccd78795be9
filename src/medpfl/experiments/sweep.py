"""A grid of attack x defense x strength x seed: privacy and utility of the same defended federation.

Each cell's federation is `medpfl train`'s, with the defense at every site in every round. Utility: its
final model on held-out images. Privacy (`privacy="federation"`, the default): its curious server attacks
what the sites of that same federation sent at the first and last round (the same model, the same kind of
update, the same noise draws), so a defense's strength means the same on both sides. `privacy="paper"`
reproduces the paper's protocol instead: one image's gradient on a fresh paper LeNet per victim.

Run directory: config.json; results.jsonl (one line per finished cell: kind "privacy" for an attack on
the defended updates, kind "utility" for the federation trained with the defense in every round);
cells/<name>/ (each cell's own run directory, which itself resumes); tradeoff.csv and tradeoff.png.
Cells run in parallel worker processes (or on a Ray cluster); the driver alone writes results.jsonl,
so a killed sweep loses only unfinished cells, and the same command finishes the grid.
"""

from __future__ import annotations

import json
import multiprocessing
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
from medpfl.fl.settings import FederationSettings
from medpfl.jsonl import read_jsonl

PRIVACY_MODES = ("federation", "paper")


@dataclass(frozen=True)
class SweepConfig(FederationSettings):
    """Everything that determines a sweep's results: each cell's federation (`medpfl train`'s settings, with the
    overrides below) and the grid."""

    # The auditor's worst case by default: plain iDLG and every attack that knows the defense, best per image.
    attacks: list[str] = field(default_factory=lambda: ["strongest"])
    defenses: list[str] = field(default_factory=lambda: ["none"])  # specs, each with lists of strengths
    data: str | None = None  # None: the embedded real-image set
    # "federation": attack the cell's own federation (below); "paper": the paper's single-image protocol.
    privacy: str = "federation"
    n_images: int = 16  # "paper": images attacked per cell, the same images in every cell of a seed
    seeds: int | list[int] = 1  # how many (seeds 0, 1, ...), or which
    image_size: int = 32
    channels: int = 3
    # GroupNorm: DP-SGD needs per-example gradients, which BatchNorm entangles; the LeNets have no norm.
    norm: str = "group"
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"invgrad": {"steps": 200}}
    # "paper": the model each attack runs on (default: the paper's), and the threat (as medpfl attack's
    # options): images behind each victim's update, label access, BatchNorm mode.
    models: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1
    labels: str | None = None
    bn_mode: str | None = None
    utility: bool = True  # train a federation per defense and seed (needs medpfl.fl's engine)
    # The federation, as `medpfl train` takes it, with train's defaults (fl.settings) but these overrides, so
    # that the privacy half measures updates the gradient attacks can invert: the paper's setting inside a
    # federation, FedSGD (the update is a gradient) on sites of one image each, on iDLG's LeNet. There iDLG
    # recovered every attacked image (SSIM 1.00, embedded set, 16 px); on 4 images per update it recovers none
    # (README, Batches), and on the GroupNorm ConvNet it kept restarting without an answer. More images per
    # site buy utility at the attack's expense; FedAvg of several local steps needs the update-inversion attack.
    model: str = "lenet-idlg"
    protocol: str = "fedsgd"
    site_images: int = 1  # 0: every image of the site's share
    # FedSGD's server step, and local epochs and momentum that FedSGD does not use (they matter under --protocol
    # fedavg only): the values the sweeps recorded in benchmarks/results ran, kept so that their numbers stand
    # and they resume (a resumed sweep must record the same settings).
    local_epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    device: str = "cpu"
    # Canaries of a one-run privacy audit (`medpfl train --audit-dp`) in each utility cell's federation, where
    # its defense gives an epsilon to check (DP-SGD, client-level DP) or none is used; 0: no audit. Privacy
    # cells never carry canaries: they would change the updates the attacks invert.
    audit_canaries: int = 0

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def federation(self, defense: str, seed: int, attack: str | None = None):
        """The `medpfl train` run of one cell: the federation with `defense` inside; with `attack`, its curious
        server attacks every site's update (the aggregate, under secure aggregation) at the first and last round."""
        from medpfl.experiments.privacy_audit import auditable
        from medpfl.experiments.train_run import TrainRunConfig

        secure = parse_defense(defense).channel is not None
        audited = attack is None and auditable(parse_defense(defense))
        # "paper": `norm` is the attacked paper models'; the federation keeps medpfl train's (GroupNorm).
        norm = self.norm if self.privacy == "federation" else TrainRunConfig.norm
        return TrainRunConfig(
            **self.federation_settings(), data=self.data, model=self.model, norm=norm, image_size=self.image_size,
            channels=self.channels, attack=attack,
            attack_rounds=sorted({1, self.rounds}) if attack else [],
            attack_sites=list(range(self.sites)) if attack and not secure else [],
            attack_settings=dict(self.attack_settings.get(attack, {})) if attack else {},
            engine="flower" if secure else "inprocess", defense=defense, seed=seed,
            audit_canaries=self.audit_canaries if audited else 0, device=self.device)

    def site_sizes(self) -> list[int]:
        """Images per site of the sweep's federation (IID; the same for every seed's draw up to one image)."""
        from medpfl.data import open_verified
        from medpfl.fl.partition import federate, keep_per_site

        source = open_verified(self.data)[0]  # broken files left out, as every cell's run does
        return keep_per_site(federate(source, self.sites, self.partition, 0), self.site_images, 0).n_images

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
        from medpfl.defenses.dpsgd import dp_schedules

        worst = chain.local.for_sites(dp_schedules(self.site_sizes(), self.training, self.rounds))
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
    from medpfl.attacks import attack_names

    bad = [a for a in config.attacks if a not in attack_names()]
    if bad or not config.attacks:
        raise MedPFLError(f"--attacks '{','.join(bad or config.attacks)}' names no known attack; "
                          f"choose from: {', '.join(attack_names())}.")
    if config.n_images < 1 or not config.seed_list:
        raise MedPFLError(f"--n-images ({config.n_images}) and --seeds ({config.seeds}) must be 1 or more.")
    if config.audit_canaries and not config.utility:
        raise MedPFLError("--audit-dp audits the federations of the utility cells; drop --no-utility.")
    if config.partition != "iid":
        raise MedPFLError(f"--partition {config.partition}: a sweep's federations are IID (its DP-SGD is calibrated "
                          "once for the grid's site sizes, which other partitions draw anew per seed); train one "
                          "such federation with medpfl train --partition.")
    if config.privacy not in PRIVACY_MODES:
        raise MedPFLError(f"--privacy must be one of {', '.join(PRIVACY_MODES)}, got '{config.privacy}'.")
    if config.privacy == "federation" and (config.models or config.batch_size != 1 or config.labels or config.bn_mode):
        raise MedPFLError("models, batch_size, labels and bn_mode set the paper's protocol (--privacy paper); a "
                          "federation's attack takes its model (--model), images per update (--site-images) and "
                          "its attacks' own threat.")
    chains = config.chains()
    if config.privacy == "federation":
        _check_attackable(config, chains)
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


def _check_attackable(config: SweepConfig, chains: list[Chain]) -> None:
    """Refuse, before anything runs, a federation whose updates an attack of the grid cannot take as they are."""
    from medpfl.attacks import unrolling_attacks
    from medpfl.attacks.defense_aware import STRONGEST

    steps = max(config.training.steps(n) for n in config.site_sizes())
    gradient_attacks = [a for a in config.attacks if a not in [*unrolling_attacks(), STRONGEST]]
    if steps > 1 and gradient_attacks:
        raise MedPFLError(f"--attacks {gradient_attacks[0]} inverts gradients, but the sweep's FedAvg sites take {steps} "
                          f"local steps per round; attack them with {', '.join(unrolling_attacks())}, or use "
                          "--protocol fedsgd (or --local-epochs 1 with --site-images at most --local-batch), or "
                          "--privacy paper.")
    for chain in chains:
        if chain.channel is not None and (len(chain.defenses) > 1 or chain.sites_per_update != config.sites):
            raise MedPFLError(f"--defenses {chain.label()}: a federation runs secure aggregation as Flower's SecAgg+ "
                              f"over all its sites, alone; write secagg:k={config.sites} (--sites), or measure "
                              "privacy with --privacy paper.")


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
    if sweep.privacy == "paper":
        return _paper_privacy(job, sweep, path)
    return _federation_privacy(job, sweep, path)


_PRIVACY_FIELDS = ("n_images", "images_per_update", "asr", "asr_chance", "success_ssim", "mean_ssim", "median_ssim",
                   "mean_psnr", "mean_mse", "label_accuracy", "label_chance", "reid_rate", "reid_chance",
                   "seconds_per_image", "epsilon", "model", "num_classes")


def _paper_privacy(job: dict[str, Any], sweep: SweepConfig, path: Path) -> dict[str, Any]:
    """The paper's protocol: each of n_images victims' single-image gradient on a fresh paper model."""
    from medpfl.experiments.attack_run import AttackRunConfig, run_attack

    settings = dict(sweep.attack_settings.get(job["attack"], {}))
    config = AttackRunConfig(attack=job["attack"], data=sweep.data, model=sweep.models.get(job["attack"]),
                             image_size=sweep.image_size, channels=sweep.channels, batch_size=sweep.batch_size,
                             n_images=sweep.n_images * parse_defense(job["defense"]).sites_per_update,
                             seed=job["seed"], norm=sweep.norm, device=sweep.device, settings=settings,
                             labels=sweep.labels, bn_mode=sweep.bn_mode, defense=job["defense"])
    summary = run_attack(config, path)
    chain = parse_defense(job["defense"]).calibrated()
    return {**{k: summary[k] for k in _PRIVACY_FIELDS}, "delta": chain.local.delta if chain.local else None}


def _federation_privacy(job: dict[str, Any], sweep: SweepConfig, path: Path) -> dict[str, Any]:
    """The curious server of the cell's own defended federation, attacking every update it received at the
    first and last round; scored over every image behind them."""
    import statistics

    from medpfl.experiments.train_run import ATTACKS_FILE, reidentification, run_training
    from medpfl.metrics.chance import pooled_label_chance
    from medpfl.metrics.privacy import SUCCESS_SSIM

    config = sweep.federation(job["defense"], job["seed"], job["attack"])
    summary = run_training(config, path)
    attacks = read_jsonl(path / ATTACKS_FILE)
    ssims = [s for a in attacks for s in a["ssim"]]
    hits = [h for a in attacks for h in a["label_correct"]]
    n = len(ssims)
    reid, gallery, guess = reidentification(path, attacks, sweep.data, sweep.image_size, sweep.channels, job["seed"])
    chain = parse_defense(job["defense"]).calibrated()
    return {
        "n_images": n, "images_per_update": n / len(attacks),
        "asr": sum(s >= SUCCESS_SSIM for s in ssims) / n, "success_ssim": SUCCESS_SSIM,
        "asr_chance": float((guess >= SUCCESS_SSIM).float().mean()),
        "mean_ssim": statistics.fmean(ssims), "median_ssim": statistics.median(ssims),
        "mean_psnr": statistics.fmean(p for a in attacks for p in a["psnr"]),
        "mean_mse": statistics.fmean(m for a in attacks for m in a["mse"]),
        "label_accuracy": sum(hits) / n, "reid_rate": sum(reid) / n, "reid_chance": 1 / gallery,
        # A random guess of each update's labels, scored as multisets like the attack: 1/K for one image.
        "label_chance": pooled_label_chance([a["labels"] for a in attacks], _classes(path)),
        "seconds_per_image": sum(a["seconds"] for a in attacks) / n, "epsilon": summary["epsilon"],
        "model": config.model, "num_classes": _classes(path),
        "attacked_rounds": config.attack_rounds, "observed": sorted({a["observed"] for a in attacks}),
        # The federation the attacked updates came from, trained to its end: the utility cell's, recomputed.
        "federation_accuracy": summary["final"]["accuracy"],
        "delta": chain.local.delta if chain.local else None,
    }


def _classes(path: Path) -> int:
    return len(json.loads((path / "federation.json").read_text())["classes"])


def _utility(job: dict[str, Any], sweep: SweepConfig, path: Path) -> dict[str, Any]:
    """The cell's federation trained with the defense (no attack): its final model on held-out images."""
    from medpfl.experiments.train_run import run_training

    config = sweep.federation(job["defense"], job["seed"])
    started = time.perf_counter()
    summary = run_training(config, path)
    last = read_jsonl(path / "rounds.jsonl")[-1]
    chain = parse_defense(job["defense"]).calibrated()
    audit = summary.get("dp_audit", {})  # measured (lower, 95%) beside the accountant's epsilon
    return {**summary["final"], "accuracy_chance": summary["chance"]["accuracy"],
            "balanced_accuracy_chance": summary["chance"]["balanced_accuracy"], "test_images": summary["n_test"],
            "model": config.model,
            "train_seconds": time.perf_counter() - started, "epsilon": summary["epsilon"],
            "noise_multiplier": last.get("noise_multiplier"), "delta": chain.local.delta if chain.local else None,
            "epsilon_measured": audit.get("epsilon_lower"), "guarantee_broken": audit.get("guarantee_broken"),
            # DP-SGD per site: each site's epsilon, sample rate and noisy steps (the worst-off site's is `epsilon`)
            **{k: last[k] for k in ("epsilon_per_site", "dp_sample_rate_per_site", "dp_steps_per_site") if k in last}}


def _limit_threads(threads: int) -> None:
    """Each worker gets its share of the cores: oversubscribed BLAS threads made one attack ~17x slower here."""
    import torch

    torch.set_num_threads(threads)


def run_sweep(config: SweepConfig, out: str | Path, workers: int | None = None, ray_address: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the grid into `out`; returns the trade-off rows also written to tradeoff.csv/.png."""
    jobs = plan(config)
    recorded = asdict(config)
    if recorded["partition"] == "iid":
        del recorded["partition"]  # so sweeps recorded before it was an option still resume
    if not config.audit_canaries:
        del recorded["audit_canaries"]  # so sweeps recorded before audits existed still resume
    path = open_run_dir(out, recorded)
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
            # Spawned, not forked: a worker forked from a process that already ran a Flower simulation inherits
            # Ray's threads and sockets half-alive and dies in its own (a secure-aggregation cell runs one).
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_limit_threads, initargs=(threads,)) as pool:
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

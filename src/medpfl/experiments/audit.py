"""`medpfl audit`: every run a config asks for, into one directory, then one report.

Directory: config.json (the audit's config, seeds, versions); audit.jsonl (one line per finished job, so
a killed audit resumes without repeating one); DATA/ATTACK-none-seedS/ (attack runs on plain updates,
themselves resumable); DATA/defenses/ (medpfl sweep's grid: each defended attack and the utility of a
federation trained with each defense, tradeoff.csv); DATA/federation-seedS/ (medpfl train with a curious
server); report.html, results.csv and summary.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medpfl.data import Skipped, open_verified
from medpfl.errors import MedPFLError
from medpfl.experiments.audit_config import AuditConfig
from medpfl.experiments.run_dir import append_result, library_versions, read_results, write_json, write_skipped
from medpfl.fl.settings import FederationSettings

if TYPE_CHECKING:
    from medpfl.experiments.sweep import SweepConfig
    from medpfl.experiments.train_run import TrainRunConfig

LEDGER = "audit.jsonl"


def plan(config: AuditConfig) -> list[dict[str, Any]]:
    """The audit's jobs in the order they run: attacks on plain updates (quick, the core), the defense grid
    (each defended attack, and a federation trained with each defense for its utility), then federations."""
    grid = config.defenses != ["none"] or config.utility.enabled
    jobs = []
    for data in config.data:
        for seed in config.seeds:
            for attack in config.attacks:
                name = attack.name + (f"-{attack.model}" if attack.model else "")
                jobs.append({"kind": "attack", "data": data, "attack": attack.name, "model": attack.model,
                             "defense": "none", "seed": seed, "dir": f"{data}/{name}-none-seed{seed}"})
        if grid:
            jobs.append({"kind": "defenses", "data": data, "dir": f"{data}/defenses"})
        for seed in config.seeds:
            if config.federation is not None:
                jobs.append({"kind": "federation", "data": data, "seed": seed, "dir": f"{data}/federation-seed{seed}"})
    return jobs


def _attack_job(config: AuditConfig, job: dict[str, Any], out: Path,
                progress: Callable[[int, int], None] | None, resume: bool) -> dict[str, Any]:
    from medpfl.experiments.attack_run import AttackRunConfig, run_attack

    attack = next(a for a in config.attacks if a.name == job["attack"] and a.model == job["model"])
    run = AttackRunConfig(attack=attack.name, data=config.data[job["data"]], model=attack.model,
                          image_size=config.image_size, channels=config.channels,
                          batch_size=config.threat.batch_size, n_images=attack.n_images or config.n_images,
                          seed=job["seed"],
                          norm=config.norm, device=config.device, settings=dict(attack.settings),
                          labels=config.threat.labels, bn_mode=config.threat.bn_mode)
    summary = run_attack(run, out / job["dir"], resume=resume, progress=progress)
    return {k: summary.get(k) for k in ("asr", "asr_chance", "mean_ssim", "mean_psnr", "mean_mse", "label_accuracy",
                                        "label_chance", "reid_rate", "reid_chance", "seconds_per_image", "epsilon")}


def _unavailable(key: str, what: str) -> MedPFLError:
    return MedPFLError(f"Audit config key '{key}' needs {what}, which this installation lacks; "
                       f"remove '{key}' from the config (or set it to false/null).")


def federation_run(config: AuditConfig, job: dict[str, Any]) -> TrainRunConfig:
    """The `medpfl train` run of a federation job: the config's `federation` section on one data set and seed."""
    from medpfl.experiments.train_run import TrainRunConfig

    return TrainRunConfig(data=config.data[job["data"]], image_size=config.image_size, channels=config.channels,
                          seed=job["seed"], device=config.device, **asdict(config.federation))


def _federation_job(config: AuditConfig, job: dict[str, Any], out: Path,
                    progress: Callable[[int, int], None] | None, resume: bool) -> dict[str, Any]:
    from medpfl.experiments.train_run import run_training

    summary = run_training(federation_run(config, job), out / job["dir"], resume=resume, progress=progress)
    attacked = summary.get("attacks") or []
    return {**summary["final"], "rounds": summary["rounds"], "epsilon": summary.get("epsilon"),
            **({"dp_audit": summary["dp_audit"]} if "dp_audit" in summary else {}),
            **({"asr": sum(a["asr"] for a in attacked) / len(attacked),
                "mean_ssim": sum(a["mean_ssim"] for a in attacked) / len(attacked)} if attacked else {})}


def defenses_sweep(config: AuditConfig, job: dict[str, Any]) -> SweepConfig:
    """The `medpfl sweep` of a defenses job: the paper's protocol for privacy (each attack on single images of
    its own model), as the audit's attack jobs; utility from `medpfl train`'s federation (FedAvg on every
    image of each site, fl.settings' defaults) with the config's utility sites and rounds."""
    from medpfl.experiments.sweep import SweepConfig
    from medpfl.experiments.train_run import TrainRunConfig

    defended = [a for a in config.attacks if a.defended]  # one per name (AuditConfig.check)
    train = FederationSettings(sites=config.utility.sites, rounds=config.utility.rounds)
    return SweepConfig(privacy="paper", attacks=[a.name for a in defended], defenses=list(config.defenses),
                       data=config.data[job["data"]], n_images=config.n_images, seeds=list(config.seeds),
                       image_size=config.image_size, channels=config.channels, norm=config.norm,
                       attack_settings={a.name: dict(a.settings) for a in defended},
                       models={a.name: a.model for a in defended if a.model},
                       batch_size=config.threat.batch_size, labels=config.threat.labels,
                       bn_mode=config.threat.bn_mode, utility=config.utility.enabled, model=TrainRunConfig.model,
                       device=config.device, **train.federation_settings())


def _defenses_job(config: AuditConfig, job: dict[str, Any], out: Path,
                  progress: Callable[[int, int], None] | None, resume: bool) -> dict[str, Any]:
    """medpfl sweep's grid: every defended attack (batch 1, the sweep's conventions) and its utility."""
    from medpfl.experiments.sweep import run_sweep

    rows = run_sweep(defenses_sweep(config, job), out / job["dir"], workers=1, progress=progress)
    kept = ("attack", "defense", "asr", "mean_ssim", "mean_psnr", "label_accuracy", "reid_rate", "epsilon", "accuracy")
    return {"rows": len(rows), "grid": [{k: row.get(k) for k in kept} for row in rows]}


JOBS: dict[str, Callable[..., dict[str, Any]]] = {"attack": _attack_job, "defenses": _defenses_job,
                                                  "federation": _federation_job}


def run_audit(config: AuditConfig, out: str | Path, resume: bool = True,
              progress: Callable[[int, int, str], None] | None = None, strict: bool = False,
              on_skipped: Callable[[str, list[Skipped]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every job of the audit into `out`, then write its report; returns the summary.

    Each data set's broken files are found first, as every command does (`data.open_verified`): handed to
    `on_skipped` with the data set's name and listed in DATA/skipped.json (each run leaves them out), or,
    with `strict`, refused before anything runs."""
    jobs = plan(config)
    if any(j["kind"] == "defenses" for j in jobs):
        try:
            import medpfl.experiments.sweep  # noqa: F401
        except ImportError:
            raise _unavailable("defenses", "medpfl sweep (defenses with utility)") from None
    skipped = {name: open_verified(data, strict)[1] for name, data in config.data.items()}
    path = _open(Path(out), config, resume)
    for name, files in skipped.items():
        (path / name).mkdir(exist_ok=True)
        write_skipped(path / name, files)
        if files and on_skipped:
            on_skipped(name, files)
    done = {r["dir"]: r for r in read_results(path, LEDGER)}
    started = time.perf_counter()
    for index, job in enumerate(jobs):
        if job["dir"] in done:
            continue
        label = " ".join(str(job[k]) for k in ("kind", "data", "attack", "defense") if job.get(k))
        if progress:
            progress(index, len(jobs), label)

        def inner(finished: int, total: int, index=index, label=label) -> None:
            if progress and total:
                progress(index + finished / total, len(jobs), label)

        job_started = time.perf_counter()
        result = JOBS[job["kind"]](config, job, path, inner, resume)
        record = {**job, **result, "seconds": time.perf_counter() - job_started}
        append_result(path, record, LEDGER)
        done[job["dir"]] = record
    if progress:
        progress(len(jobs), len(jobs), "report")
    return {"title": config.title, "jobs": len(jobs), "seconds_this_session": time.perf_counter() - started,
            "results": [done[j["dir"]] for j in jobs]}


def _open(out: Path, config: AuditConfig, resume: bool) -> Path:
    """Create `out` and record the config; a finished or partial audit resumes only with the same config."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedPFLError(f"Cannot create the audit folder '{out}' ({exc.strerror}); pass a writable --out.") from None
    record = json.loads(json.dumps(asdict(config), default=str))
    if record["federation"] and not record["federation"]["site_images"]:
        del record["federation"]["site_images"]  # so audits recorded before the section had it still resume
    ledger = out / LEDGER
    if ledger.exists() and (out / "config.json").exists():
        previous = json.loads((out / "config.json").read_text()).get("config", {})
        if previous != record and resume:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise MedPFLError(f"'{out}' holds an audit with other settings ({', '.join(changed)}); pass a new --out, "
                              "the same config to resume it, or --fresh to start over.")
    if not resume:
        ledger.unlink(missing_ok=True)
    write_json(out / "config.json", {"config": record, "seed": config.seeds, "versions": library_versions(),
                                     "argv": sys.argv})
    return out

"""The `medpfl` command: inspect data, attack shared updates, and record what leaks."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich import box
from rich.markup import escape
from rich.table import Table

from medpfl.errors import MedPFLError

console = Console(stderr=True)
out = Console()


def _parser() -> argparse.ArgumentParser:
    from medpfl.attacks import ATTACKS, LABEL_ACCESS, attack_names
    from medpfl.experiments.sweep import SweepConfig
    from medpfl.fl.settings import add_arguments as add_federation_arguments
    from medpfl.fl.gradients import BN_MODES
    from medpfl.models.registry import MODELS, check_model_name

    parser = argparse.ArgumentParser(prog="medpfl", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    # --quiet is accepted after the command too; SUPPRESS keeps it from resetting the top-level one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="what a data source holds").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", parents=[common], help="count images per class, sizes and modes, and name broken files")
    inspect.add_argument("source", nargs="?", help="class folders, .npz, DICOM or NIfTI (default: embedded set)")
    inspect.add_argument("--strict", action="store_true", help="fail if any file is broken")
    inspect.add_argument("--no-verify", action="store_true", help="read headers only, do not decode every file")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    sample = data.add_parser("sample", parents=[common], help="build (once) and locate the embedded real-image set")
    sample.add_argument("--rebuild", action="store_true", help="build it again even if cached")

    attack = commands.add_parser("attack", parents=[common], help="reconstruct images from shared updates and score the leak",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="attacks:\n" + "\n".join(
                                     textwrap.fill(e.summary, 100, initial_indent=f"  {e.name:<18}",
                                                   subsequent_indent=" " * 20) for e in ATTACKS.values()))
    attack.add_argument("--data", help="class folders, .npz, DICOM or NIfTI (default: embedded real images)")
    attack.add_argument("--attack", default="idlg", choices=sorted(attack_names()))
    attack.add_argument("--model", type=check_model_name, metavar="MODEL",
                        help=f"{', '.join(sorted(MODELS))}, or your own torch model as module:callable "
                             "(default: the model the paper used for the attack)")
    attack.add_argument("--model-kwargs", metavar="K=V,...", help="arguments for your module:callable model, e.g. "
                        "spatial_dims=2,in_channels=3,out_channels=6")
    attack.add_argument("--image-size", type=int, default=32)
    attack.add_argument("--channels", type=int, default=3, choices=(1, 3))
    attack.add_argument("--batch-size", type=int, default=1, help="images behind each shared update")
    attack.add_argument("--n-images", type=int, default=32, help="images attacked in all")
    attack.add_argument("--seed", type=int, default=0)
    attack.add_argument("--steps", type=int, help="optimiser steps (paper: 300 L-BFGS, 24000 Adam)")
    attack.add_argument("--restarts", type=int,
                        help="Inverting Gradients: restarts (paper: 8); L-BFGS attacks: fresh starts for failed "
                             "victims (default 7; the paper: 0)")
    attack.add_argument("--bins", type=int, help="imprint: the malicious server's bins (default: 4 x the images "
                        "behind each update)")
    attack.add_argument("--paper", action="store_true",
                        help="the paper's optimisation procedure: one start per image for DLG/iDLG/CPL "
                             "(300 L-BFGS steps, no restarts); 24000 steps and 8 restarts for invgrad")
    attack.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other attack setting, e.g. --set tv_weight=1e-4 (repeatable)")
    attack.add_argument("--labels", choices=LABEL_ACCESS,
                        help="hand the attacker the true labels, or make it recover them from the update "
                             "(default: as the paper ran the attack: granted for invgrad only)")
    attack.add_argument("--bn-mode", choices=BN_MODES,
                        help="BatchNorm in the sites' training step: batch statistics (train) or running "
                             "statistics (eval); default: as the paper ran the attack: eval for invgrad only")
    attack.add_argument("--norm", default="batch", choices=("batch", "group", "none"))
    attack.add_argument("--model-state", metavar="PATH",
                        help="attack a trained model: a state dict saved with torch.save(model.state_dict(), PATH)")
    attack.add_argument("--pretrain-steps", type=int, default=0, metavar="N",
                        help="train each victim's model N SGD steps on images of the source not attacked, first")
    attack.add_argument("--defense", default="none", metavar="SPEC",
                        help="defense on the observed update, e.g. laplace:b=0.01, clip:norm=1+gaussian:sigma=0.01, "
                             "topk:prune=0.9, quant:bits=4, dpsgd:epsilon=8, secagg:k=4 (default: none)")
    attack.add_argument("--victims-per-batch", type=int, default=64,
                        help="victims per vectorised attack, results written after each (bounds memory)")
    attack.add_argument("--device", default="auto", help="auto (the GPU if there is one, else the CPU), cpu, cuda, "
                                                         "cuda:1, mps")
    attack.add_argument("--strict", action="store_true", help="refuse to start if any file of --data is broken "
                                                              "(default: skip and name them)")
    attack.add_argument("--out", default=None, help="run directory (default: runs/ATTACK-MODEL-seedS)")
    attack.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    attack.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                        help="Inverting Gradients: save the optimiser state this often, to resume after a crash")

    audit = commands.add_parser("audit", parents=[common],
                                help="run every attack, defense and federation a config names; one report")
    audit.add_argument("config", nargs="?",
                       help="a YAML audit config, or a shipped one: demo (default), medpfl-paper")
    audit.add_argument("--out", help="audit directory (default: runs/audit-NAME)")
    audit.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                       help="audit your data sets instead of the config's, e.g. --data skin=/data/melanoma "
                            "(repeatable)")
    audit.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    audit.add_argument("--strict", action="store_true", help="refuse to start if any file of a data set is broken "
                                                             "(default: skip and name them)")

    report = commands.add_parser("report", parents=[common],
                                 help="write report.html and results.csv for a run directory")
    report.add_argument("run_dir",
                        help="a directory written by medpfl attack, train, sweep or audit (or a folder of them)")
    report.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    _add_train_parser(commands, common)

    sweep = commands.add_parser("sweep", parents=[common],
                                help="attack x defense x strength x seed: privacy and utility, trade-off table and plot")
    sweep.add_argument("--config", metavar="FILE", help="a YAML or JSON file of sweep settings, e.g. "
                       "configs/paper-defense.yaml; options given here override it")
    sweep.add_argument("--data", help="class folders, .npz, DICOM or NIfTI (default: embedded real images)")
    sweep.add_argument("--attacks", help="comma-separated attacks (default: strongest, every attack that fits the "
                       "defense, best per image)")
    sweep.add_argument("--defenses", nargs="+", metavar="SPEC",
                       help="defense specs, each with a list of strengths, e.g. none laplace:b=0.01,0.005 "
                            "gaussian:sigma=0.01 dpsgd:epsilon=1,4,16 topk:prune=0.9,0.99 quant:bits=4,8 secagg:k=2,4,8")
    sweep.add_argument("--privacy", choices=("federation", "paper"),
                       help="federation (default): attack what the cell's defended federation's sites sent at its "
                            "first and last round; paper: the paper's protocol, one image's gradient on a fresh "
                            "paper LeNet per victim")
    sweep.add_argument("--n-images", type=int, help="--privacy paper: images attacked per cell (default: 16)")
    sweep.add_argument("--seeds", type=int, help="seeds per cell (default: 1)")
    sweep.add_argument("--image-size", type=int, help="default: 32")
    sweep.add_argument("--channels", type=int, choices=(1, 3), help="default: 3")
    add_federation_arguments(sweep, SweepConfig())  # each cell's federation
    sweep.add_argument("--model", help="the federation's model (default: lenet-idlg)")
    sweep.add_argument("--no-utility", action="store_true", help="measure privacy only (no federated training)")
    sweep.add_argument("--audit-dp", metavar="canaries=N",
                       help="audit each utility cell's federation with N canaries (as medpfl train --audit-dp): "
                            "epsilon measured (lower, 95%%) beside the accountant's, for dpsgd, cdp and none")
    sweep.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                       help="an attack setting for one attack, e.g. --set invgrad.steps=200 (repeatable)")
    sweep.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    sweep.add_argument("--ray", metavar="ADDRESS", help="run the cells on this Ray cluster ('local' starts one)")
    sweep.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    sweep.add_argument("--out", default="runs/sweep", help="sweep directory (default: runs/sweep)")
    return parser


def _parse_setting(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise MedPFLError(f"--set '{text}' needs the form KEY=VALUE, e.g. --set tv_weight=1e-4.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes
    return key.strip(), value


def _progress(quiet: bool, *labels: str):
    """A progress display and one update(done, total) per label; each line appears at its first update."""
    if quiet:
        return None, [None for _ in labels]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("left"), TimeRemainingColumn(), console=console)

    def updater(label: str):
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task(label, total=total)
            bar.update(task, completed=done, total=total)
        return update
    return bar, [updater(label) for label in labels]


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from medpfl.data import format_report, inspect_source

    bar, (update,) = _progress(args.quiet, "checking files")
    with bar or nullcontext():
        report = inspect_source(args.source, strict=args.strict, verify=not args.no_verify, progress=update)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        # Into a file or a pipe, nothing is cut or folded to a pretend terminal's 80 columns: whole paths.
        (out if out.is_terminal else Console(width=100_000)).print(format_report(report))


def cmd_data_sample(args: argparse.Namespace) -> None:
    from medpfl.data.embedded import describe_embedded, ensure_embedded

    ensure_embedded(rebuild=args.rebuild)
    info = describe_embedded()
    table = Table(title=f"Embedded real medical images: {info['n_images']} at {info['size'][0]}x{info['size'][1]}")
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, count in info["per_class"].items():
        table.add_row(name, str(count))
    out.print(table)
    out.print(f"Stored in {info['path']} (provenance and licences in the CSV and README beside it).")


def cmd_attack(args: argparse.Namespace) -> None:
    from medpfl.experiments.attack_run import AttackRunConfig, run_attack
    from medpfl.metrics.intervals import observed_rate_sentence, rate_interval
    from medpfl.models.registry import parse_model_kwargs

    settings = dict(_parse_setting(s) for s in args.set)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.restarts is not None:
        settings["restarts"] = args.restarts
    if args.bins is not None:
        settings["bins"] = args.bins
    config = AttackRunConfig(attack=args.attack, data=args.data, model=args.model,
                             model_kwargs=parse_model_kwargs(args.model_kwargs), image_size=args.image_size,
                             channels=args.channels, batch_size=args.batch_size, n_images=args.n_images,
                             seed=args.seed, norm=args.norm, victims_per_batch=args.victims_per_batch,
                             device=args.device, settings=settings, labels=args.labels,
                             bn_mode=args.bn_mode, paper=args.paper, model_state=args.model_state,
                             pretrain_steps=args.pretrain_steps,
                             defense=args.defense)
    run = Path(args.out or f"runs/{config.attack}-{config.model_name.replace(':', '-')}-seed{config.seed}")

    bar, (checking, update) = _progress(args.quiet, "checking files", f"{config.attack} on {config.model_name}")
    with bar or nullcontext():
        summary = run_attack(config, run, resume=not args.fresh, progress=update,
                             checkpoint_every=args.checkpoint_every, strict=args.strict, checking=checking,
                             on_skipped=_warn_skipped(run))
    defended = "" if summary["defense"] == "none" else f", defense {summary['defense']}"
    table = Table(title=f"{summary['attack']} on {summary['model']}, {summary['n_images']} images of "
                        f"{summary['data']}{defended}")
    for column in ("", "observed", "95% interval", "chance"):
        table.add_column(column, justify="left" if not column else "right")
    n = summary["n_images"]
    for name, key, chance in ((f"ASR (SSIM >= {summary['success_ssim']:g})", "asr", f"{summary['asr_chance']:.2f}"),
                              ("label accuracy", "label_accuracy", f"{summary['label_chance']:.2f}"),
                              ("re-identified", "reid_rate", f"{summary['reid_chance']:.2g}")):
        table.add_row(name, f"{summary[key]:.2f} ({round(summary[key] * n)} of {n})",
                      f"{summary[key + '_low']:.2f}-{summary[key + '_high']:.2f}", chance)
    out.print(table)
    out.print(f"Mean SSIM {summary['mean_ssim']:.3f}, PSNR {summary['mean_psnr']:.1f} dB, MSE "
              f"{summary['mean_mse']:.4f}; {summary['seconds_per_image']:.2f} s of attack per image.")
    out.print(f"Re-identification: nearest of {summary['reid_gallery_size']} images by SSIM; a random guess is "
              f"right {summary['reid_chance']:.2g} of the time.")
    out.print(f"ASR (SSIM >= {summary['success_ssim']:g}): "
              + observed_rate_sentence("reconstructed", rate_interval(summary["asr"], summary["n_images"])))
    if "site_check_refused" in summary:
        out.print(f"The server sent a model of its own making; sites that check the model they receive would have "
                  f"refused {summary['site_check_refused']} of {summary['n_victims']}: "
                  f"{summary['site_check_reason'] or 'none refused'}", soft_wrap=True, highlight=False)
    report = _report(run, args.quiet)
    out.print(f"Results in {run}/ (summary.json, results.jsonl, reconstructions.png"
              + (f", {report.name}" if report else "") + ")")


def _add_train_parser(commands, common: argparse.ArgumentParser) -> None:
    from medpfl.attacks import attack_names
    from medpfl.experiments.train_run import ENGINES, VECTORISE, TrainRunConfig
    from medpfl.fl.settings import add_arguments as add_federation_arguments
    from medpfl.models.registry import MODELS, check_model_name

    d = TrainRunConfig()
    train = commands.add_parser("train", parents=[common],
                                help="federated training; a curious server attacks chosen rounds and sites")
    train.add_argument("--data", help="class folders, .npz, DICOM or NIfTI (default: embedded real images)")
    train.add_argument("--model", default=d.model, type=check_model_name, metavar="MODEL",
                       help=f"{', '.join(sorted(MODELS))}, or your own torch model as module:callable")
    train.add_argument("--model-kwargs", metavar="K=V,...", help="arguments for your module:callable model")
    train.add_argument("--model-state", metavar="PATH", help="start the global model from a state dict saved with "
                       "torch.save(model.state_dict(), PATH) instead of fresh weights")
    train.add_argument("--norm", default=d.norm, choices=("batch", "group", "none"))
    train.add_argument("--image-size", type=int, default=d.image_size)
    train.add_argument("--channels", type=int, default=d.channels, choices=(1, 3))
    add_federation_arguments(train, d)
    train.add_argument("--attack", help=f"attack chosen sites' updates: {', '.join(sorted(attack_names()))}; imprint "
                       "and trap make the server malicious (it sends the crafted model at --attack-rounds and reads "
                       "each --attack-sites site's update, or under --defense secagg:k=SITES on --engine flower, "
                       "their aggregate)")
    train.add_argument("--attack-rounds", help="rounds to attack, e.g. 1,20 or 1-3")
    train.add_argument("--attack-sites", help="sites to attack (0-based), e.g. 0 or 0,2")
    train.add_argument("--attack-batch", type=int,
                       help="attack a probe update of the site's first K images of the round instead of its full "
                            "update (training is unchanged)")
    train.add_argument("--steps", type=int, help="attack optimiser steps")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other attack setting")
    train.add_argument("--defense", default=d.defense, metavar="SPEC",
                       help="a defense at every site in every round (in-process engine), e.g. dpsgd:epsilon=8 "
                            "or clip:norm=1+gaussian:sigma=0.01; on --engine flower: secagg:k=SITES (SecAgg+)")
    train.add_argument("--audit-dp", metavar="canaries=N",
                       help="measure a 95%% lower bound on epsilon with N canaries (one-run audit) beside the "
                            "accountant's upper bound: gradient canaries under dpsgd and without DP, canary "
                            "clients under cdp")
    train.add_argument("--engine", default=d.engine, choices=ENGINES)
    train.add_argument("--no-site-check", dest="site_check", action="store_false",
                       help="the sites train on whatever model they receive (default: they check it first and "
                            "refuse an anchor); only to measure what the check prevents, e.g. with a malicious "
                            "server: --attack imprint --attack-sites 0 --set bins=N")
    train.add_argument("--vectorise", default=d.vectorise, choices=VECTORISE,
                       help="in-process: train equal-sized sites in one vmapped call (auto: on accelerators only; on a "
                            "CPU the sites otherwise train side by side, one per core)")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--device", default=d.device, help="auto (the GPU if there is one, else the CPU), cpu, cuda, "
                       "cuda:1, mps")
    train.add_argument("--out", help="run directory (default: runs/train-MODEL-PARTITION-seedS)")
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    train.add_argument("--strict", action="store_true", help="refuse to start if any file of --data is broken "
                                                             "(default: skip and name them)")


def _warn_skipped(run: Path):
    """What every command does with the broken files of --data: name them before any work starts."""
    def warn(skipped) -> None:
        listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped)
        console.print(f"[yellow]warning:[/yellow] {len(skipped)} file(s) of the data cannot be used and are left "
                      f"out (listed in {run / 'skipped.json'}; --strict refuses them):\n{listing}",
                      soft_wrap=True, highlight=False)
    return warn


def train_config(args: argparse.Namespace):
    """The TrainRunConfig `medpfl train`'s parsed options describe."""
    from medpfl.experiments.privacy_audit import parse_audit
    from medpfl.experiments.train_run import TrainRunConfig, parse_int_list
    from medpfl.fl.settings import given
    from medpfl.models.registry import parse_model_kwargs

    settings = dict(_parse_setting(s) for s in args.set)
    if args.steps is not None:
        settings["steps"] = args.steps
    return TrainRunConfig(
        **given(args), data=args.data, model=args.model, model_kwargs=parse_model_kwargs(args.model_kwargs),
        model_state=args.model_state, norm=args.norm, image_size=args.image_size, channels=args.channels,
        attack=args.attack, attack_rounds=parse_int_list(args.attack_rounds, "--attack-rounds"),
        attack_sites=parse_int_list(args.attack_sites, "--attack-sites"), attack_batch=args.attack_batch,
        attack_settings=settings, engine=args.engine, defense=args.defense, vectorise=args.vectorise,
        seed=args.seed, device=args.device, audit_canaries=parse_audit(args.audit_dp), site_check=args.site_check)


def cmd_train(args: argparse.Namespace) -> None:
    from medpfl.experiments.train_run import run_training

    config = train_config(args)
    run = Path(args.out or f"runs/train-{config.model.replace(':', '-')}-{config.partition.replace(':', '')}-seed{config.seed}")
    bar, (checking, update) = _progress(args.quiet, "checking files", "rounds")
    with bar or nullcontext():
        summary = run_training(config, run, resume=not args.fresh, progress=update, strict=args.strict,
                               checking=checking, on_skipped=_warn_skipped(run))
    table = Table(title=f"{config.model}, {summary['sites']} sites ({summary['partition']}), "
                        f"{summary['rounds']} rounds")
    for column in ("", "accuracy", "balanced acc.", "macro AUC"):
        table.add_column(column, justify="right")
    for name, row in (("global model", summary["final"]), ("chance", summary["chance"])):
        table.add_row(name, *(f"{row[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "auc")))
    out.print(table)
    if summary.get("epsilon_per_site"):
        per_site = ", ".join(f"{e:.2f}" for e in summary["epsilon_per_site"])
        out.print(f"defense {config.defense}: epsilon {summary['epsilon']:.2f} over the whole run at the worst-off "
                  f"site (per site: {per_site}), per example at delta {summary['dp_delta']:g}")
    elif summary.get("epsilon") is not None:
        out.print(f"defense {config.defense}: epsilon {summary['epsilon']:.2f} over the whole run")
    if "dp_audit" in summary:
        _print_audit(summary["dp_audit"])
    for a in summary["attacks"]:
        who = "all sites" if a["observed"] == "aggregate" else f"site {a['site']}"
        out.print(f"round {a['round']} {who} ({a['observed']} update, {a['images']} images): "
                  f"ASR {_with_interval(a, 'asr')}, label acc. {_with_interval(a, 'label_accuracy')} (95% "
                  f"intervals in brackets), SSIM {a['mean_ssim']:.3f}, PSNR {a['mean_psnr']:.1f} dB")
    report = _report(run, args.quiet)
    out.print(f"Results in {run}/ (rounds.jsonl, attacks.jsonl, model.pt, summary.json"
              + (f", {report.name}" if report else "") + ")")


def _print_audit(audit: dict) -> None:
    """Epsilon accountant (upper) vs epsilon measured (lower, 95%), and a loud warning when they contradict."""
    upper = "none (no DP guarantee)" if audit["epsilon_upper"] is None else f"{audit['epsilon_upper']:.2f}"
    out.print(f"privacy audit ({audit['canaries']} {audit['canary']}, {audit['level']} level): epsilon accountant "
              f"(upper) {upper} vs epsilon measured (lower, {audit['confidence']:.0%}) {audit['epsilon_lower']:.2f} "
              f"({audit['correct']} of {audit['guesses']} membership guesses right)")
    if audit["guarantee_broken"]:
        console.print(f"[bold red]warning:[/bold red] the measured epsilon {audit['epsilon_lower']:.2f} exceeds the "
                      f"accountant's {audit['epsilon_upper']:.2f}: the DP mechanism or its accounting is broken, "
                      "and the run's privacy guarantee does not hold.")


def _with_interval(row: dict, key: str) -> str:
    """A rate and its 95% interval, e.g. '0.00 [0.00-0.49]'."""
    if row.get(key) is None:
        return ""
    return f"{row[key]:.2f} [{row[key + '_low']:.2f}-{row[key + '_high']:.2f}]"


def _report(run: Path, quiet: bool) -> Path | None:
    """Write the run's report.html; a failure is reported and never costs the results already written."""
    from medpfl.report import build_report

    try:
        return build_report(run)
    except Exception as exc:  # noqa: BLE001 - the results are safe on disk whatever goes wrong here
        console.print(f"[yellow]warning:[/yellow] the report could not be written ({exc}); the results are "
                      f"saved, and `medpfl report {run}` tries again.")
        return None


def cmd_audit(args: argparse.Namespace) -> None:
    import time

    from medpfl.experiments.audit import run_audit
    from medpfl.experiments.audit_config import load_audit_config

    config = load_audit_config(args.config)
    if args.data:  # the user's data sets replace the config's
        config.data = {}
        for text in args.data:
            name, _, path = text.partition("=")
            if not name or not path:
                raise MedPFLError(f"--data '{text}' must be NAME=PATH, e.g. --data skin=/data/melanoma.")
            config.data[name] = path
        config.check()
    name = Path(args.config).stem if args.config else "demo"
    run = Path(args.out or f"runs/audit-{name}")
    started = time.perf_counter()
    bar = None if args.quiet else Progress(TextColumn("{task.description}"), BarColumn(),
                                           TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                           TextColumn("left"), TimeRemainingColumn(), console=console)
    task = bar.add_task("audit", total=None) if bar else None

    def update(done: float, total: int, label: str) -> None:
        if bar:
            bar.update(task, completed=done, total=total, description=f"audit: {label}")

    with bar or nullcontext():
        summary = run_audit(config, run, resume=not args.fresh, progress=update, strict=args.strict,
                            on_skipped=lambda name, skipped: _warn_skipped(run / name)(skipped))
    table = Table(title=f"{config.title}: {summary['jobs']} runs")
    for column in ("run", "ASR", "mean SSIM", "mean PSNR", "label acc.", "re-id", "epsilon", "accuracy"):
        table.add_column(column, justify="left" if column == "run" else "right")
    number = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for job in summary["results"]:  # a defense grid's job: one row per attack and defense setting
        for r in ([{**cell, "dir": f"{job['dir']} {cell['attack']} {cell['defense']}"} for cell in job["grid"]]
                  if "grid" in job else [job]):
            table.add_row(r["dir"], number(r.get("asr"), ".2f"), number(r.get("mean_ssim"), ".3f"),
                          number(r.get("mean_psnr"), ".1f"), number(r.get("label_accuracy"), ".2f"),
                          number(r.get("reid_rate"), ".2f"), number(r.get("epsilon"), ".2f"),
                          number(r.get("accuracy"), ".3f"))
    out.print(table)
    for job in summary["results"]:
        if "dp_audit" in job:
            out.print(f"{job['dir']}: ", end="")
            _print_audit(job["dp_audit"])
    report = _report(run, args.quiet)
    out.print(f"Audit finished in {time.perf_counter() - started:.0f} s. Report: {report or '(not written)'}; "
              f"per-image results: {run / 'results.csv'}.")


def cmd_report(args: argparse.Namespace) -> None:
    from medpfl.report import build_report

    path = build_report(args.run_dir, args.out)
    out.print(f"Report: {path} (open it in a browser; it needs no network). Per-image results: "
              f"{Path(args.run_dir) / 'results.csv'}")


def sweep_config(args: argparse.Namespace):
    """The SweepConfig `medpfl sweep`'s parsed options describe: its --config file, overridden by the options."""
    from medpfl.experiments.privacy_audit import parse_audit
    from medpfl.experiments.sweep import SweepConfig, load_sweep_config
    from medpfl.fl.settings import given as federation_given

    fields = load_sweep_config(args.config) if args.config else {}
    given = {"data": args.data, "n_images": args.n_images, "seeds": args.seeds, "image_size": args.image_size,
             "channels": args.channels, "device": args.device, "defenses": args.defenses, "privacy": args.privacy,
             "model": args.model,
             "audit_canaries": parse_audit(args.audit_dp) or None,
             "attacks": args.attacks and [a.strip() for a in args.attacks.split(",") if a.strip()]}
    fields.update({k: v for k, v in given.items() if v is not None}, **federation_given(args))
    if args.no_utility:
        fields["utility"] = False
    settings = {k: dict(v) for k, v in fields.get("attack_settings", {}).items()}
    for text in args.set:
        key, value = _parse_setting(text)
        attack, dot, name = key.partition(".")
        if not dot or not name:
            raise MedPFLError(f"--set '{text}' needs the form ATTACK.KEY=VALUE, e.g. --set invgrad.steps=200.")
        settings.setdefault(attack, {})[name] = value
    return SweepConfig(**{**fields, "attack_settings": settings})


def cmd_sweep(args: argparse.Namespace) -> None:
    from medpfl.experiments.sweep import run_sweep
    from medpfl.report.tradeoff import utility_at_chance

    config = sweep_config(args)
    bar, (update,) = _progress(args.quiet, "sweep cells")
    with bar or nullcontext():
        rows = run_sweep(config, args.out, workers=args.workers, ray_address=args.ray, progress=update)
    table = Table(title=f"Privacy and utility per defense ({args.out}/tradeoff.csv)", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, collapse_padding=True)
    audited = any(r.get("epsilon_measured") is not None for r in rows)
    for column in ("attack", "defense", "images", "ASR", "label acc.", "re-id", "acc.", "epsilon",
                   *(["measured"] if audited else [])):
        table.add_column(column, justify="right", overflow="fold" if column == "defense" else "ellipsis",
                         min_width=9 if column in ("ASR", "label acc.", "re-id", "measured") else None)  # whole
    for r in rows:  # each rate over its 95% interval, so that the table fits a terminal
        table.add_row(r["attack"], r["defense"], str(r["n_images"]),
                      *(f"{r[key]:.2f}\n{r[key + '_low']:.2f}-{r[key + '_high']:.2f}"
                        for key in ("asr", "label_accuracy", "reid_rate")),
                      "pending" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                      "" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
                      *([_measured(r)] if audited else []))
    out.print(table)
    if audited:
        out.print("epsilon: the accountant's (upper bound); measured: the one-run audit's 95% lower bound on the "
                  "same federation (--audit-dp), averaged over seeds.")
    at_chance = utility_at_chance(rows)
    if at_chance:
        console.print(f"[bold red]warning:[/bold red] {at_chance}")
    for r in rows:
        if r.get("guarantee_broken"):
            console.print(f"[bold red]warning:[/bold red] {r['defense']}: a measured epsilon exceeds the accountant's: "
                          "the DP mechanism or its accounting is broken, and its privacy guarantee does not hold.")
    privacy = "the paper's protocol (one image's gradient on a fresh paper model per victim)" if \
        config.privacy == "paper" else "attacks on what each federation's sites sent at its first and last round"
    out.print(f"Privacy: {privacy}. Under each rate its 95% interval (Wilson) over the images scored.")
    out.print(f"Results in {args.out}/ (results.jsonl, tradeoff.csv, tradeoff.png)")


def _measured(row: dict) -> str:
    """A trade-off row's measured epsilon for the console: '>= x', in red when it refutes the accountant."""
    if row.get("epsilon_measured") is None:
        return ""
    text = f">={row['epsilon_measured']:.2f}"
    return f"[bold red]{text} BROKEN[/bold red]" if row.get("guarantee_broken") else text


COMMANDS = {("data", "inspect"): cmd_data_inspect, ("data", "sample"): cmd_data_sample, ("attack", None): cmd_attack,
            ("train", None): cmd_train, ("report", None): cmd_report, ("audit", None): cmd_audit,
            ("sweep", None): cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medpfl` console command."""
    args = _parser().parse_args(argv)
    try:
        COMMANDS[(args.command, getattr(args, "data_command", None))](args)
    except MedPFLError as exc:
        # The sentence as written: a value such as dirichlet:-1: is no emoji code, [0, 1) no markup.
        console.print(f"[red]error:[/red] {escape(str(exc))}", emoji=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; finished results are saved and the same command resumes the run")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

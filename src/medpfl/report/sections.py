"""The report's sections: each takes what the run directory holds and returns a Section, or None when the
directory holds nothing for it (a sweep section without a sweep, a training section without training). The
numbers come from report.statistics; here they become sentences, tables and figures."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from medpfl.attacks import ATTACKS, display_name as attack_name
from medpfl.metrics.intervals import Rate, observed_rate_sentence, rate_interval
from medpfl.report import plots
from medpfl.report.html import Section, esc, img, img_file, table
from medpfl.report.malicious import section_malicious_server
from medpfl.report.runs import AttackRun, ImageResult, Run, SweepRun, TrainRun
from medpfl.report.sources import Context
from medpfl.report.statistics import (PRIVACY_COLUMNS, SAFE_ASR, SUCCESS_SSIM, UTILITY_COLUMNS, RunStats,
                                      attack_table, data_name, defense_table, first_column, recommendations,
                                      risk_level, run_stats, update_leak)
from medpfl.report.tradeoff import pareto_front, utility_at_chance

RANKED_ROWS = 40  # rows of the per-image ranking shown in the page; results.csv holds all
PAIRS_SHOWN = 4  # best and worst reconstructions shown per run
RUNS_WITH_PICTURES = 12  # runs whose reconstructions are shown (the others are in the tables)


def _label(run: AttackRun | TrainRun) -> str:
    """A short name for a run: attack, defense, and round/site context where the run has one."""
    name = attack_name(run.attack)
    if run.defense not in ("none", ""):
        name += f" + {run.defense}"
    if isinstance(run, TrainRun):
        name += " in training"
    return name


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _interval(rate: Rate) -> str:
    """' [low-high]', a rate's 95% interval as the tables show it beside the rate."""
    return f" [{rate.low:.2f}-{rate.high:.2f}]" if rate.trials else ""


def plain_findings(run: AttackRun | TrainRun, stats: RunStats) -> list[str]:
    """The run's numbers with their meaning, in sentences."""
    observed = observed_rate_sentence("reconstructed", stats.interval("asr")).rstrip(".")
    lines = [f"ASR {stats.asr:.2f} (reconstructed: SSIM \u2265 {stats.success_ssim:g}): {observed}"
             + (f"; an attacker answering with a random image of the same data would reach {stats.asr_chance:.2f}"
                if stats.asr_chance is not None else "") + "."]
    if stats.reid_rate is not None:
        hits = round(stats.reid_rate * stats.n)
        line = f"Re-identification {stats.reid_rate:.2f}{_interval(stats.interval('reid_rate'))}: {hits} of " \
               f"{stats.n} reconstructions are most similar to their own patient's image"
        if stats.reid_gallery:
            line += f" among {stats.reid_gallery} images of the data; a random guess would re-identify 1 in " \
                    f"{stats.reid_gallery}"
        lines.append(line + ".")
    if stats.label_accuracy is not None:
        hits = round(stats.label_accuracy * stats.n)
        line = f"Label accuracy {stats.label_accuracy:.2f}{_interval(stats.interval('label_accuracy'))}: the " \
               f"attacker learned the class (diagnosis or modality) of {hits} of {stats.n} images"
        if stats.label_chance is not None:
            line += (f"; guessing each update's labels at random among {stats.num_classes} classes would get "
                     f"{stats.label_chance:.2f}")
        lines.append(line + ".")
    lines.append(f"Mean SSIM {stats.mean_ssim:.3f} (1 is a perfect copy"
                 + (f", a random image of the data scores {stats.mean_ssim_chance:.3f}" if stats.mean_ssim_chance
                    is not None else "") + f"), mean PSNR {stats.mean_psnr:.1f} dB; "
                 f"{stats.seconds_per_image:.2f} s of attack per image.")
    return lines


# ---------------------------------------------------------------- sections


def section_overview(ctx: Context) -> Section | None:
    attacked = ctx.attacked
    if not attacked and not ctx.sweeps:
        return None
    parts = ["<p class=lead>This report shows what an adversary who sees the model updates a hospital shares in "
             "federated learning could reconstruct of its patients' images, measured by running the attacks on "
             "real images and comparing each reconstruction with the original.</p>"]
    ranked = sorted(attacked, key=lambda r: -run_stats(r).asr)
    if ranked:
        items = []
        for run in ranked:
            stats = run_stats(run)
            items.append(f"<li><strong>{esc(_label(run))}</strong> ({esc(run.name)}): "
                         f"{esc(plain_findings(run, stats)[0])}</li>")
        parts.append("<h3>What leaked</h3><ul class=findings>" + "".join(items) + "</ul>")
        worst = ranked[0]
        stats = run_stats(worst)
        n = sum(run_stats(r).n for r in ranked)
        verdict = ("Patients' images can be recovered from the shared updates." if stats.asr > 0 else
                   f"No attacked image was reconstructed recognisably in these runs (0 of {n}). That is what was "
                   "observed, not a guarantee: each run's interval above says how high its true rate may still "
                   "be; see the re-identification and per-image sections for weaker leaks.")
        parts.append(f"<p><strong>In short:</strong> {esc(verdict)}</p>")
    for sweep in ctx.sweeps:
        rec = _recommendations(sweep)
        if rec:
            parts.append("<h3>Recommended defense settings</h3><ul class=findings>"
                         + "".join(f"<li>{esc(r)}</li>" for r in rec) + "</ul>")
    return Section("overview", "Summary", "".join(parts))


def section_threat_model(ctx: Context) -> Section | None:
    attacked = ctx.attacked
    if not attacked:
        return None
    parts = ["<p>The adversary is the server that coordinates training, assumed honest but curious: it runs "
             "the protocol as agreed but studies what it receives. An eavesdropper on the connection between a "
             "hospital and the server is in the same position. For each shared update it sees exactly two things: "
             "the model it sent to the hospital (architecture and current weights) and the update the hospital "
             "sent back. It never sees the patients' images, and sees their labels only where stated below.</p>"]
    rows: dict[tuple, list[str]] = {}  # one row per distinct threat setting, listing its defenses
    for run in attacked:
        cfg = run.config
        if isinstance(run, AttackRun):
            granted = cfg.get("labels_granted")
            batch = (run.summary or {}).get("images_per_update") or cfg.get("batch_size", 1)
            bn = cfg.get("bn_mode_used") or cfg.get("bn_mode")
            norm = cfg.get("norm", "batch")
            model_note = "a shared model" if cfg.get("shared_model") else "a freshly initialised model per update"
            context = f"one update per victim, {model_note}"
        else:
            entry = ATTACKS.get(str(cfg.get("attack")))
            granted = entry is not None and entry.threat.knows_labels
            # The images behind each attacked update as recorded: a probe's K, a whole update's every image
            # the site trained on that round, an aggregate's images of all sites (not the local batch).
            sizes = sorted({len(a["ssim"]) for a in run.attacks})
            batch = "-".join(map(str, dict.fromkeys((sizes[0], sizes[-1])))) if sizes else "?"
            bn, norm = "train", cfg.get("norm", "group")
            rounds = ", ".join(map(str, cfg.get("attack_rounds", []))) or "?"
            sites = ("the secure aggregate of all sites" if any(a["site"] < 0 for a in run.attacks) else
                     "sites " + (", ".join(map(str, cfg.get("attack_sites", []))) or "?"))
            context = (f"{cfg.get('protocol', '?')} training of {cfg.get('sites', '?')} sites for "
                       f"{cfg.get('rounds', '?')} rounds; updates of {sites} attacked at rounds {rounds}")
        labels = ("handed the true labels (a stronger adversary than usual)" if granted else
                  "recovered by the attacker from the update itself")
        if norm != "batch":
            bn_text = f"no BatchNorm ({norm} normalisation)"
        else:
            bn_text = ("batch statistics (an ordinary training step)" if bn == "train" else
                       "running statistics (network in eval mode, as the Inverting Gradients paper computed updates)")
        key = (attack_name(run.attack), cfg.get("model", "?"), str(batch), labels, bn_text, context)
        defenses = rows.setdefault(key, [])
        if run.defense not in defenses:
            defenses.append(run.defense)
    parts.append(table(["attack", "model", "images per update", "labels", "BatchNorm", "setting", "defenses"],
                       [[*key, ", ".join(defenses)] for key, defenses in rows.items()], numeric=[2]))
    attacks = list(dict.fromkeys(run.attack for run in attacked))
    parts.append("<p>How the attacks work:</p><ul>" + "".join(
        f"<li><strong>{esc(attack_name(a))}</strong> {esc(_plain(a))}.</li>" for a in attacks) + "</ul>")
    parts.append("<p class=note>Images per update: how many of a hospital's images stand behind one shared "
                 "update (in training: every image a site trained on in the round, all sites' under secure "
                 "aggregation, or a probe's few). More images per update blend into one another and are harder "
                 "to separate.</p>")
    return Section("threat-model", "Threat model: who sees what", "".join(parts))


def section_data(ctx: Context) -> Section | None:
    attacked = ctx.attacked
    if not attacked:
        return None
    parts = []
    by_source: dict[str, list] = defaultdict(list)
    for run in attacked:
        by_source[str(run.config.get("data") or "embedded")].append(run)
    for source, runs in by_source.items():
        classes = ctx.originals.class_names(runs[0])
        rows = runs[0].images()
        # A training run attacks an image again in every attacked round: count the patients once each.
        patients = ({r.item_id: r.label for r in rows} if all(r.item_id for r in rows)
                    else dict(enumerate(r.label for r in rows)))
        counts = Counter(patients.values())
        name = "the embedded real-image set" if source == "embedded" else source
        cfg = runs[0].config
        parts.append(f"<h3>Data: {esc(name)}</h3>")
        if source == "embedded":
            parts.append("<p>726 real medical images at 64x64 pixels in six modalities (CT, MR, X-ray, "
                         "ultrasound, fundus photography, histology), cut from files that open-source Python "
                         "packages ship (pydicom, pydicom-data, nibabel, scikit-image), each with its provenance "
                         "and licence recorded.</p>")
        parts.append(f"<p>Images are resized to {cfg.get('image_size', '?')}x{cfg.get('image_size', '?')} pixels "
                     f"with {cfg.get('channels', '?')} channel(s). The first run here attacked "
                     f"{_count(len(patients), 'image')}"
                     + (f" ({len(rows)} reconstructions over the attacked rounds)" if len(rows) > len(patients) else "")
                     + ":</p>")
        parts.append(table(["class", "images attacked"],
                           [[classes[k] if classes and isinstance(k, int) and k < len(classes) else k, v]
                            for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))], numeric=[1]))
    for run in (r for r in ctx.train_runs if r.federation):
        fed, cfg = run.federation or {}, run.config
        parts.append(f"<h3>Federation: {esc(run.name)}</h3>")
        sizes = fed.get("n_images") or []
        parts.append(f"<p>{_count(len(sizes) or cfg.get('sites', 0), 'site')} ({esc(cfg.get('partition', '?'))} "
                     f"partition), {sum(sizes)} training images, {fed.get('n_test', '?')} held-out test images; "
                     f"protocol {esc(cfg.get('protocol', '?'))}, {cfg.get('local_epochs', '?')} local epoch(s) of "
                     f"batch {cfg.get('local_batch', '?')}, learning rate {cfg.get('lr', '?')}, "
                     f"{cfg.get('rounds', '?')} rounds.</p>")
        if sizes and fed.get("label_counts"):
            classes = fed.get("classes") or []
            parts.append(table(["site", "images", *classes],
                               [[s, n, *fed["label_counts"][s]] for s, n in enumerate(sizes)],
                               numeric=list(range(1, 2 + len(classes)))))
    return Section("data", "Data", "".join(parts))


def section_results(ctx: Context) -> Section | None:
    attacked = ctx.attacked
    if not attacked:
        return None
    has_eps = any(run_stats(r).epsilon is not None for r in attacked)
    sources = {run.name: data_name(run) for run in attacked}
    many_sources = len(set(sources.values())) > 1
    rows, groups = [], {}
    for run in attacked:
        s = run_stats(run)
        asr = f"{s.asr:.2f}{_interval(s.interval('asr'))}" + (f" (chance {s.asr_chance:.2f})"
                                                               if s.asr_chance is not None else "")
        reid = (_fmt(s.reid_rate) + (_interval(s.interval("reid_rate")) if s.reid_rate is not None else "")
                + (f" (chance 1/{s.reid_gallery})" if s.reid_gallery and s.reid_rate is not None else ""))
        label = (_fmt(s.label_accuracy) + (_interval(s.interval("label_accuracy")) if s.label_accuracy is not None
                                           else "")
                 + (f" (chance {s.label_chance:.2f})" if s.label_chance is not None and s.label_accuracy is not None
                    else ""))
        row = [run.name] + ([sources[run.name]] if many_sources else []) + [
            attack_name(run.attack), run.config.get("model", "?"), run.defense]
        if has_eps:
            row.append(_fmt(s.epsilon, 2))
        rows.append(row + [s.n, asr, f"{s.mean_ssim:.3f}", f"{s.mean_psnr:.1f} dB", f"{s.mean_mse:.4f}", label,
                           reid, f"{s.seconds_per_image:.2f}"])
        groups[run.name] = [r.ssim for r in run.images()]
    header = ["run"] + (["data"] if many_sources else []) + ["attack", "model", "defense"] + (
        ["epsilon"] if has_eps else []) + ["images", "ASR", "mean SSIM", "mean PSNR", "mean MSE", "label accuracy",
                                          "re-identified", "s / image"]
    first_num = header.index("epsilon" if has_eps else "images")
    parts = []
    by_attack = attack_table(ctx.runs)
    if len(attacked) > 1 and by_attack:
        parts.append("<h3>By attack and data set</h3>" + _attack_table_html(by_attack) + "<h3>Every run</h3>")
    parts.append(table(header, rows, numeric=list(range(first_num, len(header)))))
    parts.append("<p class=note>ASR (attack success rate): share of images reconstructed with SSIM \u2265 0.9, "
                 "the paper's threshold for a recognisable copy; in brackets, each rate's 95% interval (Wilson) over "
                 "the images scored: with few images the true rate may lie far from the observed one. SSIM (structural similarity, 0 to 1) and PSNR "
                 "(higher is closer) compare each reconstruction with its original, both clamped to [0,1]. "
                 "Re-identified: the reconstruction is more similar to its own image than to any other image of "
                 "the data. Chance levels: what an attacker would score by answering with a random image of the "
                 "data, or a random label per image. Labels are scored as a set per update (the attack learns "
                 "which labels, not whose), so with several images per update a random guess scores above "
                 "1/classes. Time: wall time of the attack alone.</p>")
    if _has_client_dp(run.defense for run in attacked):
        parts.append(f"<p class=note><strong>{esc(CLIENT_DP_NOTE)}.</strong></p>")
    for run in attacked:
        parts.append(f"<h3>{esc(_label(run))} ({esc(run.name)})</h3><ul class=findings>"
                     + "".join(f"<li>{esc(line)}</li>" for line in plain_findings(run, run_stats(run))) + "</ul>")
    labels = {run.name: _label(run) for run in attacked}
    if len(set(labels.values())) == len(labels):  # short names where they tell the runs apart
        groups = {labels[name]: values for name, values in groups.items()}
    parts.append("<figure>" + img(plots.ssim_strip(groups, SUCCESS_SSIM), "SSIM of every attacked image per run",
                                  "plot") + "<figcaption>How close each reconstruction came to its original. Dots "
                 "above the dashed line are recognisable copies.</figcaption></figure>")
    return Section("results", "Results per attack", "".join(parts))


def _plain(attack: str) -> str:
    """How `attack` works in plain words (for an attack not registered here, that it is unknown)."""
    entry = ATTACKS.get(attack)
    return entry.plain if entry else "(an attack this installation does not know)"


CLIENT_DP_NOTE = ("cdp (client-level DP) does not protect against the server: the server adds the noise to the "
                  "aggregate after it has seen each site's clipped update, which is what the attack here inverted; "
                  "its epsilon covers a site's participation only towards those who see the noisy aggregate or the "
                  "trained model")


def _has_client_dp(defenses: Iterable[str]) -> bool:
    return any(part.startswith("cdp") for d in defenses for part in str(d).split("+"))


def _with_chance(value: float | None, chance: float | None, digits: int, fraction: bool = False,
                 row: dict[str, Any] | None = None, key: str = "") -> str:
    """A rate, its 95% interval where `row` holds KEY_low/KEY_high, and its chance level (1/N: one in N choices)."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if row is not None and row.get(f"{key}_high") is not None:
        text += f" [{row[key + '_low']:.2f}-{row[key + '_high']:.2f}]"
    if chance is None:
        return text
    level = f"1/{round(1 / chance)}" if fraction and chance > 0 else f"{chance:.{digits}f}"
    return f"{text} (chance {level})"


def _attack_table_html(rows: list[dict[str, Any]]) -> str:
    header = ["data set", "attack", "model", "seeds", "images", "ASR", "mean SSIM", "mean MSE", "mean PSNR",
              "s / image", "label accuracy", "re-identified"]
    cells = [[r["data"], r["attack_name"], r["model"], r["seeds"], r["n_images"],
              _with_chance(r["asr"], r["asr_chance"], 2, row=r, key="asr"), _fmt(r["mean_ssim"], 3),
              _fmt(r["mean_mse"], 4), _fmt(r["mean_psnr"], 1, " dB"), _fmt(r["seconds_per_image"], 2),
              _with_chance(r["label_accuracy"], r["label_chance"], 2, row=r, key="label_accuracy"),
              _with_chance(r["reid_rate"], r["reid_chance"], 2, fraction=True, row=r, key="reid_rate")]
             for r in rows]
    return table(header, cells, numeric=list(range(3, len(header))),
                 caption="The paper's table: each attack on its model and each data set, without defense, pooled "
                         "over seeds; in brackets, 95% intervals over the images. Time: wall time of the attack "
                         "alone, per image.")


def _pair(ctx: Context, run: Run, row: ImageResult, tag: str) -> str:
    original = ctx.originals.png(run, row.item_id)
    left = img(original, f"original {row.item_id}", "px") if original else '<span class="missing">(original n/a)</span>'
    right = img_file(row.reconstruction, f"reconstruction of {row.item_id}", "px")
    where = f" r{row.round} s{row.site}" if row.round is not None else ""
    return (f'<div class="pair"><div class="imgs">{left}{right}</div>'
            f'<span class="tag">{esc(tag)}{esc(where)}</span>SSIM {row.ssim:.3f}, {row.psnr:.1f} dB</div>')


def section_reconstructions(ctx: Context) -> Section | None:
    attacked = ctx.attacked
    if not attacked:
        return None
    parts = ["<p>Each pair shows the patient's image (left) and what the attacker reconstructed from the shared "
             "update alone (right), for the best and the worst reconstructions of each run.</p>"]
    for run in attacked[:RUNS_WITH_PICTURES]:
        rows = sorted(run.images(), key=lambda r: -r.ssim)
        k = min(PAIRS_SHOWN, len(rows) // 2) or 1
        best, worst = rows[:k], rows[-k:] if len(rows) > k else []
        parts.append(f"<h3>{esc(_label(run))} ({esc(run.name)})</h3>")
        parts.append('<div class="pairs">' + "".join(_pair(ctx, run, r, "best") for r in best)
                     + "".join(_pair(ctx, run, r, "worst") for r in worst) + "</div>")
        grid = run.path / "reconstructions.png"
        if isinstance(run, AttackRun) and grid.exists():
            parts.append("<figure>" + img_file(grid, f"originals above reconstructions, {run.name}", "grid")
                         + "<figcaption>All attacked images of the run (up to 32): each row of originals is followed "
                           "by their reconstructions.</figcaption></figure>")
    if len(attacked) > RUNS_WITH_PICTURES:
        parts.append(f"<p class=note>{len(attacked) - RUNS_WITH_PICTURES} more runs are in the tables and in "
                     "results.csv.</p>")
    if ctx.originals.problems:
        parts.append("<p class=note>Originals could not be shown for: " + esc("; ".join(
            f"{k} ({v})" for k, v in ctx.originals.problems.items())) + ".</p>")
    return Section("reconstructions", "Originals beside reconstructions", "".join(parts))


def section_risk_ranking(ctx: Context) -> Section | None:
    rows = sorted(ctx.images(), key=lambda r: -r.ssim)
    if not rows:
        return None
    run_of = {run.name: run for run in ctx.attacked}
    levels = Counter(risk_level(r) for r in rows)
    parts = [f"<p>Every attacked image, most exposed first ({levels['high']} high, {levels['medium']} medium, "
             f"{levels['low']} low risk). <span class='pill high'>high</span> the reconstruction is a recognisable "
             "copy (SSIM \u2265 0.9); <span class='pill medium'>medium</span> not a recognisable copy, but it is "
             "more similar to the patient's own image than to any other, so it re-identifies the patient; "
             "<span class='pill low'>low</span> neither.</p>"]
    show_round = any(r.round is not None for r in rows)
    table_rows = []
    for rank, row in enumerate(rows[:RANKED_ROWS], 1):
        run = run_of[row.run]
        original = ctx.originals.png(run, row.item_id)
        reid = "n/a" if row.reidentified is None else ("yes" if row.reidentified else "no")
        label = "n/a" if row.label_correct is None else ("yes" if row.label_correct else "no")
        cells = [rank, f"<span class='pill {risk_level(row)}'>{risk_level(row)}</span>",
                 img(original, "original", "px") if original else "n/a",
                 img_file(row.reconstruction, "reconstruction", "px"), f"{row.ssim:.3f}", f"{row.psnr:.1f}", reid,
                 label, esc(row.item_id), esc(f"{attack_name(row.attack)} / {row.defense}")]
        if show_round:
            cells.append(esc(f"round {row.round}, site {row.site}" if row.round is not None else "-"))
        table_rows.append(cells)
    header = ["#", "risk", "original", "reconstruction", "SSIM", "PSNR dB", "re-identified", "label learned", "image",
              "attack / defense"] + (["update"] if show_round else [])
    parts.append(table(header, table_rows, numeric=[0, 4, 5], raw=True))
    if len(rows) > RANKED_ROWS:
        parts.append(f"<p class=note>The {RANKED_ROWS} most exposed of {len(rows)} images are shown; results.csv "
                     "beside this report lists all.</p>")
    return Section("risk", "Per-image risk ranking", "".join(parts))


def section_training(ctx: Context) -> Section | None:
    runs = [r for r in ctx.train_runs if r.rounds]
    if not runs:
        return None
    parts = []
    plain = [r for r in runs if not r.attacks and r.config.get("defense") is not None]
    if len(plain) > 1:  # federations trained only for their utility, e.g. one per defense of a sweep
        parts.append(_utility_curves(plain))
    for run in (r for r in runs if r not in plain or len(plain) == 1):
        rounds = [r["round"] for r in run.rounds]
        metrics = {k: [r.get(k) for r in run.rounds] for k in ("accuracy", "balanced_accuracy", "auc")
                   if any(r.get(k) is not None for r in run.rounds)}
        chance = (run.summary or {}).get("chance") or {}
        parts.append(f"<h3>{esc(run.name)}</h3>")
        if metrics:
            last = run.rounds[-1]
            parts.append("<p>" + esc(", ".join(
                f"{k.replace('_', ' ')} {last[k]:.3f}" + (f" (chance {chance[k]:.3f})" if isinstance(
                    chance.get(k), (int, float)) else "") for k in metrics if last.get(k) is not None))
                + f" after round {last['round']}.</p>")
            parts.append("<figure>" + img(plots.per_round(rounds, {k.replace("_", " "): v for k, v in metrics.items()},
                                                          "on held-out test images", "Utility of the global model",
                                                          chance=chance.get("accuracy")), "utility per round", "plot")
                         + "<figcaption>What the federation's model is worth, round by round.</figcaption></figure>")
        parts.append(_dp_epsilon_per_site(run.summary or {}))
        parts.append(_privacy_audit(run))
        if run.attacks:
            per_site: dict[str, dict[int, float]] = defaultdict(dict)
            rows = []
            for a in sorted(run.attacks, key=lambda a: (a["round"], a["site"])):
                asr, mean, psnr = update_leak(a)
                per_site[f"site {a['site']}"][a["round"]] = mean
                rows.append([a["round"], a["site"], len(a["ssim"]), f"{asr:.2f}", f"{mean:.3f}", f"{psnr:.1f}",
                             a.get("observed", "")])
            parts.append(table(["round", "site", "images", "ASR", "mean SSIM", "mean PSNR dB", "update attacked"],
                               rows, numeric=[0, 1, 2, 3, 4, 5], caption="Leakage per round and site"))
            attacked_rounds = sorted({a["round"] for a in run.attacks})
            parts.append("<figure>" + img(plots.per_round(attacked_rounds, {
                site: [values.get(r) for r in attacked_rounds] for site, values in per_site.items()},
                "mean SSIM of reconstructions", "Leakage per round and site"), "leakage per round", "plot")
                + "</figure>")
    return Section("training", "Federated training: utility and leakage per round", "".join(parts))


def _dp_epsilon_per_site(summary: dict) -> str:
    """DP-SGD's guarantee as each site holds it: sites of different sizes spend different epsilons."""
    per_site = summary.get("epsilon_per_site")
    if not per_site:
        return ""
    worst = max(range(len(per_site)), key=per_site.__getitem__)
    images = summary.get("n_images") or []
    sites = ", ".join(f"site {s}: {e:.2f}" for s, e in enumerate(per_site))
    return (f"<p>DP-SGD: each image of a site is protected at epsilon up to {per_site[worst]:.2f} (delta "
            f"{summary.get('dp_delta', 1e-5):g}) over the whole run, at the worst-off site, site {worst}"
            + (f" with {images[worst]} images" if worst < len(images) else "")
            + f"; each site spends its own ({esc(sites)}). The guarantee holds against the server too, for one "
            "image at one site; a patient with several images, or at several sites, spends more.</p>")


def _privacy_audit(run: TrainRun) -> str:
    """Epsilon accountant (upper) vs measured (lower) of a run with `--audit-dp`, and its canaries' scores."""
    audit, scores = (run.summary or {}).get("dp_audit"), run.path / "dp_audit.json"
    if not audit or not scores.exists():
        return ""
    scores = json.loads(scores.read_text())
    upper = "none (no DP guarantee)" if audit["epsilon_upper"] is None else f"{audit['epsilon_upper']:.2f}"
    text = (f"Privacy audit, {audit['canaries']} {audit['canary']} ({audit['level']} level, one training run): "
            f"epsilon accountant (upper) {upper} vs epsilon measured (lower, {audit['confidence']:.0%}) "
            f"{audit['epsilon_lower']:.2f}, from {audit['correct']} of {audit['guesses']} membership guesses right.")
    warning = ("<p><strong>The measured epsilon exceeds the accountant's: the DP mechanism or its accounting is "
               "broken, and the run's privacy guarantee does not hold.</strong></p>" if audit["guarantee_broken"]
               else "")
    return (f"<p>{esc(text)}</p>{warning}<figure>" + img(plots.canary_scores(
        scores["scores_in"], scores["scores_out"], "Canary scores: in training against left out"), "canary scores",
        "plot") + "<figcaption>The further apart, the more the run leaks about one record.</figcaption></figure>")


def _utility_curves(runs: list[TrainRun]) -> str:
    """One line per federation: test accuracy over rounds, and a table of where each ended."""
    rounds = sorted({r["round"] for run in runs for r in run.rounds})
    label = lambda run: str(run.config.get("defense") or run.name)  # noqa: E731
    series = {label(run): [next((r.get("accuracy") for r in run.rounds if r["round"] == k), None) for k in rounds]
              for run in runs}
    rows = [[label(run), run.config.get("seed", ""), run.rounds[-1]["round"]]
            + [_fmt(run.rounds[-1].get(k), 3) for k in ("accuracy", "balanced_accuracy", "auc")]
            + [_fmt((run.summary or {}).get("epsilon"), 2)] for run in runs]
    return ("<h3>Federations trained with each defense</h3><figure>"
            + img(plots.per_round(rounds, series, "test accuracy", "Accuracy of the global model per round"),
                  "accuracy per round per defense", "plot") + "</figure>"
            + table(["defense", "seed", "rounds", "accuracy", "balanced accuracy", "AUC", "epsilon"], rows,
                    numeric=[1, 2, 3, 4, 5, 6]))


def _still_reidentifies(row: dict[str, Any]) -> str:
    """A setting that stops recognisable copies may still leave reconstructions that pick out their patient:
    where its re-identification rate's 95% interval lies above chance, a caution saying so; else ''."""
    low, chance, n = row.get("reid_rate_low"), row.get("reid_chance"), row.get("n_images")
    if low is None or not chance or not n or low <= chance:
        return ""
    return (f" (though its reconstructions still re-identify {round(row['reid_rate'] * n)} of {int(n)} patients, "
            f"chance 1/{round(1 / chance)})")


def _recommendations(sweep: SweepRun) -> list[str]:
    """Per attack, the setting statistics.recommendations picks, in a sentence."""
    cells = defense_table(sweep)
    privacy, utility = first_column(cells, PRIVACY_COLUMNS), first_column(cells, UTILITY_COLUMNS)
    if not privacy or not utility:
        return []
    lines = []
    at_chance = utility_at_chance(cells) is not None
    for attack, best, safe in recommendations(cells, privacy, utility):
        name = attack_name(attack) if attack else "the attacks"
        if safe and at_chance:  # a ranking on utility would be noise
            below = [f"{c['defense']}{_still_reidentifies(c)}" for c in cells if c["attack"] == attack
                     and c.get(privacy) is not None and c[privacy] < SAFE_ASR]
            lines.append(f"Against {name}: {', '.join(below)} kept observed ASR below {SAFE_ASR:g}; which "
                         "of them costs least in accuracy is not measured here, as no federation beats chance.")
        elif safe:
            observed = (observed_rate_sentence("reconstructed", rate_interval(best[privacy], int(best["n_images"])))
                        if best.get("n_images") else f"observed ASR {best[privacy]:.2f}.")
            lines.append(f"Against {name}: of the settings with observed ASR below {SAFE_ASR:g}, {best['defense']}"
                         f"{_still_reidentifies(best)} has "
                         f"the best {utility.replace('_', ' ')}, {best[utility]:.3f}"
                         + (f" (epsilon {best['epsilon']:.2f})" if best.get("epsilon") is not None else "")
                         + f"; {observed}")
        else:
            lines.append(f"Against {name}: no setting tested keeps ASR below {SAFE_ASR:g}; the lowest is "
                         f"{best['defense']} ({privacy} {best[privacy]:.2f}, {utility.replace('_', ' ')} "
                         f"{best[utility]:.3f}).")
    return lines


def section_tradeoff(ctx: Context) -> Section | None:
    sweeps = [s for s in ctx.sweeps if s.cells]
    if not sweeps:
        return None
    parts = []
    for sweep in sweeps:
        cells = defense_table(sweep)
        privacy, utility = first_column(cells, PRIVACY_COLUMNS), first_column(cells, UTILITY_COLUMNS)
        parts.append(f"<h3>{esc(sweep.name)}</h3>")
        apart = sorted({(str(c["model"]), str(c["trained_model"])) for c in sweep.cells
                        if c.get("model") and c.get("trained_model") and c["model"] != c["trained_model"]})
        if apart:  # --privacy paper: the attacked update is not one the trained federation sent
            parts.append("<p class=note>Privacy and utility here come from different models ("
                         + "; ".join(f"attacked {esc(m)}, trained {esc(t)}" for m, t in apart) + "): privacy by the "
                         "paper's single-image protocol. A defense's strength then means different things on the two "
                         "sides, so the front below pairs unlike quantities.</p>")
        warning = utility_at_chance(cells)
        if warning:
            parts.append(f"<p class=note><strong>{esc(warning)}</strong></p>")
        if privacy and utility:
            usable = [c for c in cells if c.get(privacy) is not None and c.get(utility) is not None]
            front = pareto_front([(c[utility], c[privacy]) for c in usable])
            points = [{"x": c[utility], "y": c[privacy], "label": c["defense"], "group": attack_name(c["attack"]),
                       "y_low": c.get(f"{privacy}_low"), "y_high": c.get(f"{privacy}_high")} for c in usable]
            parts.append("<figure>" + img(plots.tradeoff(points, f"{utility.replace('_', ' ')} (higher is better)",
                                                         f"{privacy.replace('_', ' ')} (lower leaks less)", front,
                                                         "Privacy against utility, one point per defense setting"),
                                          "privacy-utility trade-off", "plot")
                         + "<figcaption>Settings on the dashed line are not beaten on both privacy and utility by "
                           "any other. Bars: 95% intervals of the ASR over the images scored.</figcaption></figure>")
            rec = _recommendations(sweep)
            if rec:
                parts.append("<ul class=findings>" + "".join(f"<li>{esc(r)}</li>" for r in rec) + "</ul>")
        parts.append(_defense_table_html(cells))
        broken = list(dict.fromkeys(str(c["defense"]) for c in sweep.cells if str(c.get("guarantee_broken")) == "True"))
        if broken:
            parts.append(f"<p><strong>The measured epsilon exceeds the accountant's for {esc(', '.join(broken))}: the "
                         "DP mechanism or its accounting is broken, and its privacy guarantee does not hold."
                         "</strong></p>")
    return Section("tradeoff", "Defenses: privacy against utility", "".join(parts))


# The defense table's columns: header, key, digits, chance level (a key or a number), chance shown as 1/N.
_DEFENSE_COLUMNS = (
    ("images", "n_images", 0, None, False), ("ASR", "asr", 2, "asr_chance", False),
    ("mean SSIM", "mean_ssim", 3, None, False), ("mean PSNR dB", "mean_psnr", 1, None, False),
    ("mean MSE", "mean_mse", 4, None, False), ("re-identified", "reid_rate", 2, "reid_chance", True),
    ("label accuracy", "label_accuracy", 2, "label_chance", False),
    ("test accuracy", "accuracy", 3, "accuracy_chance", False),
    ("balanced accuracy", "balanced_accuracy", 3, "balanced_accuracy_chance", True),
    ("AUC", "auc", 3, 0.5, False), ("epsilon", "epsilon", 2, None, False),
    ("epsilon measured (lower, 95%)", "epsilon_measured", 2, None, False),
)


def _defense_table_html(cells: list[dict[str, Any]]) -> str:
    """Privacy and utility per attack and defense setting: the paper's defense table, with the utility it
    never measured (a federation trained with the defense at every site in every round)."""
    columns = [c for c in _DEFENSE_COLUMNS if any(cell.get(c[1]) is not None for cell in cells)]
    order = {a: i for i, a in enumerate(dict.fromkeys(c["attack"] for c in cells))}
    rows = []
    for cell in sorted(cells, key=lambda c: order[c["attack"]]):  # stable: each attack's defenses in grid order
        row = [attack_name(cell["attack"]), cell["defense"], cell["seeds"]]
        for _, key, digits, chance, fraction in columns:
            level = cell.get(chance) if isinstance(chance, str) else chance
            row.append(_with_chance(cell.get(key), level, digits, fraction, row=cell, key=key))
        rows.append(row)
    notes = ["none: no defense", "epsilon only where the defense is differential privacy"]
    if any(c.get("epsilon_measured") is not None for c in cells):
        notes.append("epsilon is the accountant's (an upper bound), epsilon measured a 95% lower bound from canaries "
                     "in the federation trained with the defense (one-run audit, --audit-dp)")
    if any(str(c["defense"]).startswith("laplace") for c in cells):
        notes.insert(1, "laplace:b=B: i.i.d. Laplace(0, B) noise on every entry of each shared update (the paper's "
                        "defense), at every site in every round of the federation whose utility is shown")
    return table(["attack", "defense", "seeds", *[c[0] for c in columns]], rows,
                 numeric=list(range(2, 3 + len(columns))),
                 caption="Each row: privacy (leak) and utility (the trained model's quality on held-out images) of "
                         "one defense setting, averaged over seeds; in brackets, the 95% interval (Wilson) of a rate "
                         "over the images scored; " + "; ".join(notes) + ".") + (
        f"<p class=note><strong>{esc(CLIENT_DP_NOTE)}.</strong></p>"
        if _has_client_dp(c["defense"] for c in cells) else "")


def section_provenance(ctx: Context) -> Section | None:
    if not ctx.runs:
        return None
    parts = ["<p>Everything needed to repeat these runs: the command, its full configuration, the seed and the "
             "library versions. The same command with the same seed gives the same results.</p>"]
    versions = [r.record.get("versions") for r in ctx.runs if r.record.get("versions")]
    if versions:
        keys = list(dict.fromkeys(k for v in versions for k in v))
        distinct = {k: sorted({str(v.get(k, "")) for v in versions}) for k in keys}
        parts.append(table(["library", "version"], [[k, ", ".join(v)] for k, v in distinct.items()],
                           caption="Python, libraries and device"))
    rows = []
    for run in ctx.runs:
        stats_time = ""
        if isinstance(run, (AttackRun, TrainRun)) and run.images():
            total = sum(r.seconds for r in run.images())
            stats_time = f"{total:.1f} s attacking"
        if isinstance(run, TrainRun) and run.rounds:
            stats_time += f"; {sum(r.get('seconds', 0) for r in run.rounds):.1f} s training"
        rows.append([run.name, type(run).__name__.replace("Run", "").lower() or "sweep", run.record.get("seed", ""),
                     stats_time, " ".join(_short_argv(run.record.get("argv") or []))])
    parts.append(table(["run", "kind", "seed", "time", "command"], rows, numeric=[2]))
    for run in ctx.runs:
        if run.config:
            text = json.dumps(run.config, indent=1, default=str)
            parts.append(f"<h3>Configuration of {esc(run.name)}</h3><pre>{esc(text)}</pre>")
    return Section("provenance", "Provenance", "".join(parts))


def _short_argv(argv: list[str]) -> list[str]:
    """The command as typed: the program's name without its install path."""
    if not argv:
        return []
    first = Path(argv[0]).name
    return ["medpfl" if first in ("medpfl", "cli.py", "__main__.py") else first, *argv[1:]]


SECTIONS: list[Callable[[Context], Section | None]] = [
    section_overview, section_threat_model, section_data, section_results, section_tradeoff, section_training,
    section_reconstructions, section_risk_ranking, section_provenance,
]
SECTIONS.insert(SECTIONS.index(section_results) + 1, section_malicious_server)  # report.malicious

"""One attack run: sample victims, compute their shared updates, attack them in batches, score, record.

Data flow: source -> sampled images -> victims (each a batch of B images on its own model) ->
observed update -> attack (sees payload + update only) -> scored against the originals here.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from medpfl.attacks import LABEL_ACCESS, ObservedUpdate, ServerPayload, attack_entry, attack_names, build_attack
from medpfl.attacks.optim import Checkpoint
from medpfl.data import ImageDataset, Skipped, open_verified, sample_items
from medpfl.defenses import parse_defense
from medpfl.defenses.observe import observed_gradients
from medpfl.device import resolve_device
from medpfl.errors import MedPFLError
from medpfl.experiments.run_dir import SKIPPED, append_result, open_run_dir, read_results, write_json, write_skipped
from medpfl.experiments.scoring import victim_record
from medpfl.experiments.victim_models import load_model_state, pretrain, true_class_probability
from medpfl.fl.gradients import BN_MODES, stack_params
from medpfl.fl.model_check import ModelCheck, fingerprint
from medpfl.metrics.chance import pooled_label_chance
from medpfl.metrics.image import ssim
from medpfl.metrics.intervals import wilson
from medpfl.metrics.privacy import SUCCESS_SSIM, reidentified
from medpfl.models.registry import build_model
from medpfl.report.images import comparison_grid, load_png, save_png
from medpfl.seeds import ATTACK_STARTS, DEFENSE_NOISE, MODEL_WEIGHTS, PRETRAIN_MINIBATCHES, stream, stream_seed


CHECKPOINT = "checkpoint.pt"  # the state of a long attack in progress, in the run directory


@dataclass
class AttackRunConfig:
    """Everything that determines an attack run's results."""

    attack: str = "idlg"
    data: str | None = None  # None: the embedded default set
    model: str | None = None  # None: the model the paper ran this attack on; or a user's module:callable
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # a module:callable model's arguments
    image_size: int = 32
    channels: int = 3
    batch_size: int = 1  # images behind each victim's update
    n_images: int = 32
    seed: int = 0
    norm: str = "batch"
    init: str | None = None  # None: the model's default (the paper's U(-0.5, 0.5) for LeNets)
    shared_model: bool = False  # one model for all victims instead of a fresh one per victim (iDLG's way)
    victims_per_batch: int = 64  # victims attacked in one vectorised optimisation; bounds memory
    success_ssim: float = SUCCESS_SSIM
    reid_gallery: int = 2000  # at most this many images of the source to re-identify against
    device: str = "auto"  # "auto": the GPU when there is one, else the CPU
    settings: dict[str, Any] = field(default_factory=dict)  # attack settings, e.g. {"steps": 100}
    paper: bool = False  # the paper's optimisation procedure (AttackEntry.paper_procedure), e.g. no L-BFGS restarts
    labels: str | None = None  # "granted" or "recovered"; None: as the paper ran the attack
    bn_mode: str | None = None  # BatchNorm in the sites' step: "train" or "eval"; None: as the paper ran it
    model_state: str | None = None  # a state dict every victim's model starts from instead of a fresh draw
    pretrain_steps: int = 0  # SGD steps each victim's model trains first, on images of the source not attacked
    pretrain_lr: float = 0.05
    pretrain_batch: int = 16
    defense: str = "none"  # a defense spec (medpfl.defenses.spec) applied to what the attacker observes

    @property
    def images_per_update(self) -> int:
        """Images behind each update the attacker sees: B, or k x B behind a secure aggregate of k sites."""
        return self.batch_size * parse_defense(self.defense).sites_per_update

    @property
    def bn_mode_used(self) -> str:
        mode = self.bn_mode or attack_entry(self.attack).bn_mode
        if mode not in BN_MODES:
            raise MedPFLError(f"--bn-mode must be one of {', '.join(BN_MODES)}, got '{mode}'.")
        return mode

    @property
    def labels_granted(self) -> bool:
        if self.labels is None:
            return attack_entry(self.attack).threat.knows_labels
        if self.labels not in LABEL_ACCESS:
            raise MedPFLError(f"--labels must be one of {', '.join(LABEL_ACCESS)}, got '{self.labels}'.")
        return self.labels == "granted"

    @property
    def model_name(self) -> str:
        return self.model or attack_entry(self.attack).default_model

    @property
    def attack_settings(self) -> dict[str, Any]:
        """The settings the attack is built with: `settings`, on top of the paper's procedure with `paper`."""
        if not self.paper:
            return dict(self.settings)
        procedure = attack_entry(self.attack).paper_procedure
        if procedure is None:
            papers = [name for name in attack_names() if attack_entry(name).paper_procedure is not None]
            raise MedPFLError(f"--paper: '{self.attack}' is not one of the paper's attacks "
                              f"({', '.join(papers)}); drop --paper.")
        clash = sorted(set(procedure) & set(self.settings))
        if clash:
            raise MedPFLError(f"--paper sets {', '.join(clash)}: drop --paper or "
                              f"the {', '.join('--' + c for c in clash)} option.")
        return {**procedure, **self.settings}


def run_attack(config: AttackRunConfig, out: str | Path, resume: bool = True,
               progress: Callable[[int, int], None] | None = None, checkpoint_every: float = 300.0,
               strict: bool = False, checking: Callable[[int, int], None] | None = None,
               on_skipped: Callable[[list[Skipped]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the attack described by `config` into `out`; returns the summary. Attacks that
    take checkpoints save their state every `checkpoint_every` seconds (it does not change results).

    Every file of the source is decoded first (`checking` reports progress): broken ones are left out of
    the attacked images and the re-identification gallery, handed to `on_skipped` before any work starts
    and listed in skipped.json, or, with `strict`, refused before the run directory is touched.
    """
    attack = build_attack(config.attack, **config.attack_settings)
    if checkpoint_every < 0:
        raise MedPFLError(f"--checkpoint-every {checkpoint_every} must be 0 or more seconds.")
    defense = parse_defense(config.defense).calibrated()
    B = config.images_per_update
    if config.n_images < B or config.n_images % B:
        raise MedPFLError(f"--n-images {config.n_images} must be a positive multiple of {B} (--batch-size "
                          f"{config.batch_size} x {defense.sites_per_update} securely aggregated sites); each "
                          "victim's observed update covers that many images.")
    stream_seed(config.seed)  # a seed that cannot seed the streams is refused before any work
    device = resolve_device(config.device)
    source, skipped = open_verified(config.data, strict, checking, on_skipped)
    items = sample_items(source.items, config.n_images, config.seed)
    dataset = ImageDataset(source, items, size=config.image_size, channels=config.channels)
    K = len(source.classes)
    bn_mode, labels_granted = config.bn_mode_used, config.labels_granted
    if config.model_state:  # a bad file is named before the run directory is touched
        victim_model(replace(config, pretrain_steps=0), K, 0)
    record = {**asdict(config), "model": config.model_name, "labels_granted": labels_granted,
              "bn_mode_used": bn_mode, "device_used": str(device), "attack_settings": attack.config(),
              "defense_config": defense.config()}
    path = open_run_dir(out, record, resume=resume)
    write_skipped(path, skipped)
    if not resume:
        (path / CHECKPOINT).unlink(missing_ok=True)
    (path / "images").mkdir(exist_ok=True)

    n_victims = config.n_images // B
    pretrain_data = _pretrain_data(config, source, items, device)
    # A malicious server builds the model it sends from images like the sites' (never the attacked ones).
    malicious = attack_entry(config.attack).threat.modifies_model
    public = _unattacked_images(config, source, items, device)[0] if malicious else None
    done = {r["victim"] for r in read_results(path)}
    todo = [v for v in range(n_victims) if v not in done]
    if progress:
        progress(len(done), n_victims)
    for start in range(0, len(todo), config.victims_per_batch):
        victims = todo[start:start + config.victims_per_batch]
        images, labels = zip(*(dataset.load_batch(range(v * B, v * B + B)) for v in victims))
        images, labels = torch.stack(images).to(device), torch.stack(labels).to(device)
        models = [victim_model(config, K, v, pretrain_data) for v in victims]
        refusals = [None] * len(models)
        if public is not None:
            sent = [attack.craft(m, tuple(images.shape[2:]), public.cpu(), B) for m in models]
            # What a site that checks the model it receives (fl.model_check) would have answered.
            refusals = [ModelCheck(fingerprint(dict(m.named_parameters()))).verify(dict(c.named_parameters()))
                        for m, c in zip(models, sent)]
            models = sent
        params = {n: p.to(device) for n, p in stack_params([dict(m.named_parameters()) for m in models]).items()}
        # The sites' side: what each victim computes, defends and shares. Ground truth stays on this side.
        defense_stream = stream(config.seed, DEFENSE_NOISE, victims[0])
        gradients = observed_gradients(defense, models[0], params, images, labels, K, bn_mode, defense_stream)
        # For the auditor: how large each update is and how sure the model was of the truth.
        update_norms = sum((g.flatten(1).double() ** 2).sum(1) for g in gradients.values()).sqrt().tolist()
        p_true = true_class_probability(models[0], params, images, labels, bn_mode).tolist()
        granted = labels if labels_granted else None
        payload = ServerPayload(models[0].to(device), params, K, tuple(images.shape[2:]), bn_mode, defense=defense)
        update = ObservedUpdate(gradients, B, labels=granted)
        generator = attack_generator(config, victims)
        # Long optimisations keep their state here, so that a crash costs minutes, not hours.
        checkpoint = Checkpoint(path / CHECKPOINT, key=json.dumps({"run": record, "victims": victims}, default=str),
                                every_seconds=checkpoint_every)
        result = attack.reconstruct(payload, update, generator,
                                    **({"checkpoint": checkpoint} if attack.takes_checkpoints else {}))
        for j, v in enumerate(victims):
            scored = _score(path, dataset, v, B, images[j], labels[j], result, j, len(victims))
            append_result(path, {**scored, "update_norm": update_norms[j], "p_true": p_true[j],
                                 **({"site_check": refusals[j]} if public is not None else {})})
        checkpoint.clear()
        if progress:
            progress(len(done) + start + len(victims), n_victims)

    summary = summarise(path, config, dataset)
    write_json(path / "summary.json", summary)
    return summary


def victim_model(config: AttackRunConfig, num_classes: int, victim: int,
                 pretrain_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model `victim` computes its update on: fresh weights per victim (or one shared model), drawn
    from the run's weight stream, independent of the attacker's; then loaded from --model-state and
    trained --pretrain-steps, each victim's minibatches from its own stream."""
    key = (MODEL_WEIGHTS,) if config.shared_model else (MODEL_WEIGHTS, victim)
    model = build_model(config.model_name, num_classes, config.channels, config.image_size,
                        init=config.init, norm=config.norm, seed=stream_seed(config.seed, *key),
                        model_kwargs=config.model_kwargs)
    if config.model_state:
        load_model_state(model, config.model_state, f"--model {config.model_name} with {num_classes} classes, "
                         f"{config.channels} channels at {config.image_size} px")
    if pretrain_data is not None:
        model.to(pretrain_data[0].device)
        pretrain(model, *pretrain_data, config.pretrain_steps, config.pretrain_lr, config.pretrain_batch,
                 stream(config.seed, PRETRAIN_MINIBATCHES, victim))
        model.cpu()
    return model


def attack_generator(config: AttackRunConfig, victims: list[int]) -> torch.Generator:
    """The attacker's random stream (starting points, restarts) for the batch of `victims` attacked
    together: its own branch of the run's seed, never the stream the victims' weights came from."""
    return stream(config.seed, ATTACK_STARTS, victims[0])


_PRETRAIN_POOL = 1024  # at most this many images of the source to pretrain on


def _pretrain_data(config: AttackRunConfig, source, attacked: list, device: torch.device):
    """Images and labels the victims' models pretrain on: the source's images that are not attacked."""
    if config.pretrain_steps < 0:
        raise MedPFLError(f"--pretrain-steps {config.pretrain_steps} must be 0 or more.")
    if not config.pretrain_steps:
        return None
    return _unattacked_images(config, source, attacked, device, "--pretrain-steps")


def _unattacked_images(config: AttackRunConfig, source, attacked: list, device: torch.device,
                       needed_by: str = "--attack imprint") -> tuple[torch.Tensor, torch.Tensor]:
    """Up to 1024 images and labels of the source that are not attacked (a server's data like the sites')."""
    taken = {it.item_id for it in attacked}
    others = [it for it in source.items if it.item_id not in taken]
    if not others:
        raise MedPFLError(f"{needed_by} needs images besides the {len(attacked)} attacked, but the source holds "
                          f"no others; lower --n-images or pass a larger --data.")
    pool = sample_items(others, min(_PRETRAIN_POOL, len(others)), config.seed + 2)
    images, labels = ImageDataset(source, pool, size=config.image_size, channels=config.channels).load_batch(
        range(len(pool)))
    return images.to(device), labels.to(device)


def _score(path: Path, dataset: ImageDataset, victim: int, B: int, originals: torch.Tensor,
           true_labels: torch.Tensor, result, j: int, n_in_batch: int) -> dict[str, Any]:
    ids = [dataset.items[victim * B + b].item_id for b in range(B)]
    record, matched = victim_record(originals, true_labels, result, j, ids, n_in_batch)
    for b in range(B):
        save_png(matched[b], path / "images" / f"victim{victim:05d}-{b}.png")
    return {"victim": victim, **record}


def summarise(path: Path, config: AttackRunConfig, dataset: ImageDataset) -> dict[str, Any]:
    """Aggregate the finished results of a run directory, adding re-identification and the PNG grid."""
    results = sorted(read_results(path), key=lambda r: r["victim"])
    B = config.images_per_update
    defense = parse_defense(config.defense).calibrated()
    ssims = [s for r in results for s in r["ssim"]]
    psnrs = [s for r in results for s in r["psnr"]]
    mses = [s for r in results for s in r["mse"]]
    hits = [h for r in results for h in r["label_correct"]]
    n = len(ssims)
    originals = torch.stack([dataset.image(r["victim"] * B + b) for r in results for b in range(B)])
    recons = torch.stack([load_png(path / "images" / f"victim{r['victim']:05d}-{b}.png", config.channels)
                          for r in results for b in range(B)])
    comparison_grid(originals[:32], recons[:32], path / "reconstructions.png")
    reid, gallery = _reidentification(config, dataset, results, recons)
    guess = _random_guess_ssim(originals, gallery, config.seed)
    skipped_file = path / SKIPPED
    skipped = len(json.loads(skipped_file.read_text())) if skipped_file.exists() else 0
    recognised = sum(s >= config.success_ssim for s in ssims)
    return {
        "attack": config.attack,
        "model": config.model_name,
        "data": config.data or "embedded",
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "images_per_update": B,
        "defense": defense.label(),
        "epsilon": defense.epsilon(),
        "n_images": n,
        "n_victims": len(results),
        "asr": recognised / n,
        # 95% intervals of the rates over the n images scored: an ASR of 0 of 4 may still be 0.49.
        **wilson(recognised, n).as_dict("asr"),
        "success_ssim": config.success_ssim,
        "mean_ssim": statistics.fmean(ssims),
        "median_ssim": statistics.median(ssims),
        "mean_psnr": statistics.fmean(psnrs),
        "mean_mse": statistics.fmean(mses),
        "label_accuracy": sum(hits) / n,
        # A random guess of each victim's B labels, scored as multisets like the attack: 1/K only for B = 1.
        "label_chance": pooled_label_chance([r["labels"] for r in results], len(dataset.classes)),
        **wilson(sum(hits), n).as_dict("label_accuracy"),  # labels are scored per image
        "reid_rate": float(reid.float().mean()),
        **wilson(int(reid.sum()), len(reid)).as_dict("reid_rate"),
        "reidentified": reid.tolist(),  # per image, in the order of results.jsonl's victims and their images
        "reid_gallery_size": len(gallery),
        # What naming a gallery image at random achieves: a re-identification rate means nothing without it.
        "reid_chance": 1 / len(gallery),
        # Chance levels: an attacker who answers with a random image of the same data.
        "asr_chance": float((guess >= config.success_ssim).float().mean()),
        "mean_ssim_chance": float(guess.mean()),
        "num_classes": len(dataset.classes),
        "diverged": sum(r["diverged"] for r in results),
        # Victims none of whose runs ever moved from its start: no answer at all, whatever their score.
        "never_moved": sum(r.get("stalled_runs", 0) == r.get("runs", -1) for r in results),
        "seconds_per_image": sum(r["seconds"] for r in results) / n,
        "evaluations_per_victim": statistics.fmean(r["evaluations"] for r in results),
        "seed": config.seed,
        "skipped_files": skipped,
        **_site_check_summary(results),
        **_strongest_summary(results, config.success_ssim),
    }


def _strongest_summary(results: list[dict], success_ssim: float) -> dict[str, Any]:
    """For --attack strongest: the ASR of the answers the attacker would pick, each attack's own ASR, and
    how many images each attack reconstructed best (ties go to the first attack run, plain iDLG)."""
    if not results or "winner" not in results[0]:
        return {}
    picked = [s for r in results for s in r["attacker_pick_ssim"]]
    by_attack = {name: [s for r in results for s in r["ssim_by_attack"][name]] for name in results[0]["ssim_by_attack"]}
    winners = [w for r in results for w in r["winner"]]
    return {
        "asr_attacker_pick": sum(s >= success_ssim for s in picked) / len(picked),
        "mean_ssim_attacker_pick": statistics.fmean(picked),
        "asr_by_attack": {name: sum(s >= success_ssim for s in ssims) / len(ssims)
                          for name, ssims in by_attack.items()},
        "mean_ssim_by_attack": {name: statistics.fmean(ssims) for name, ssims in by_attack.items()},
        "wins": {name: winners.count(name) for name in by_attack},
    }


def _site_check_summary(results: list[dict]) -> dict[str, Any]:
    """For a malicious server: how many victims' sites would have refused the model it sent, and why."""
    if not any("site_check" in r for r in results):
        return {}
    reasons = [r["site_check"] for r in results if r.get("site_check")]
    return {"site_check_refused": len(reasons), "site_check_reason": reasons[0] if reasons else None}


def _reidentification(config: AttackRunConfig, dataset: ImageDataset, results: list[dict],
                      recons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per reconstruction, whether its nearest image in the victim's data (by SSIM) is the true one;
    and that gallery (the attacked images first, in order, then others of the source)."""
    source = dataset.source
    attacked = [i for r in results for i in r["items"]]
    others = [it for it in source.items if it.item_id not in set(attacked)]
    room = max(config.reid_gallery - len(attacked), 0)
    extra = sample_items(others, min(room, len(others)), config.seed + 1) if room else []
    B = config.images_per_update
    gallery_items = [dataset.items[r["victim"] * B + b] for r in results for b in range(B)] + extra
    gallery = ImageDataset(source, gallery_items, size=config.image_size, channels=config.channels)
    images = torch.stack([gallery.image(i) for i in range(len(gallery_items))])
    return reidentified(recons, torch.arange(len(recons)), images), images


CHANCE_PARTNERS = 64  # other images of the gallery each original is compared with (all of them in smaller ones)


def _random_guess_ssim(originals: torch.Tensor, gallery: torch.Tensor, seed: int,
                       partners: int = CHANCE_PARTNERS) -> torch.Tensor:
    """SSIM of each original (index i of the gallery) against other images of the gallery, never itself: every
    other one, or `partners` of them drawn at random where there are more (n x partners). Their mean, and the
    share at or above a threshold, are what an attacker answering with a random image of the data reaches; one
    draw per original left a chance ASR at the mercy of that draw with few images."""
    n, size = len(originals), len(gallery)
    if size < 2:
        return torch.zeros(n, 1)
    generator = torch.Generator().manual_seed(seed + 2)
    count = min(partners, size - 1)
    rows = []
    for i in range(n):
        other = torch.randperm(size - 1, generator=generator)[:count]
        other = other + (other >= i).long()  # skip the original's own index
        rows.append(ssim(originals[i:i + 1].expand(count, *originals.shape[1:]), gallery[other]))
    return torch.stack(rows)

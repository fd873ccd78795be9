"""One federated training run with a curious server: rounds, utility per round, attacks at chosen rounds and sites.

Run directory: config.json; rounds.jsonl (one line per finished round); attacks.jsonl (one line per
attacked site and round, the fields of `medpfl attack`'s results plus round and site) with the
reconstructions as PNGs under attacks/; state.pt (global weights after the last finished round, for
resuming); model.pt (the final global model's state dict, loadable with torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from medpfl.attacks import ObservedUpdate, ServerPayload, attack_entry, build_attack, unrolling_attacks
from medpfl.attacks.defense_aware import MULTI_ROUND, STRONGEST
from medpfl.data import ImageDataset, Skipped, open_verified
from medpfl.defenses import Chain, parse_defense
from medpfl.defenses.training import DefendedFederation
from medpfl.device import resolve_device
from medpfl.errors import MedPFLError
from medpfl.experiments.malicious import MaliciousServer, for_secure_aggregation
from medpfl.experiments.privacy_audit import AUDIT_FILE, PrivacyAudit, compare
from medpfl.experiments.run_dir import open_run_dir, write_json, write_skipped
from medpfl.experiments.scoring import victim_record
from medpfl.experiments.victim_models import load_model_state
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import local_update
from medpfl.fl.partition import Federation, federate, keep_per_site
from medpfl.fl.rounds import AGGREGATE, RoundHooks, SiteObservation, SiteRound, ordered, received_architecture
from medpfl.fl.model_check import ModelCheck, ModelRefused, fingerprint
from medpfl.fl.settings import FederationSettings
from medpfl.fl.simulation import InProcessFederation
from medpfl.fl.utility import chance_levels, evaluate
from medpfl.jsonl import append_jsonl, read_jsonl, rewrite_jsonl
from medpfl.metrics.intervals import rate_interval, wilson
from medpfl.metrics.privacy import SUCCESS_SSIM
from medpfl.models.registry import build_model
from medpfl.report.images import save_png
from medpfl.report.runs import attacked_png
from medpfl.seeds import ATTACK, model_seed, site_order, torch_seed

ENGINES = ("inprocess", "flower")
VECTORISE = ("auto", "on", "off")
STATE, ROUNDS, ATTACKS_FILE, MODEL = "state.pt", "rounds.jsonl", "attacks.jsonl", "model.pt"
REFUSAL = "refusal.json"  # the sites refused the model a malicious server sent: the round and their reason


@dataclass(frozen=True)
class TrainRunConfig(FederationSettings):
    """Everything that determines a training run's results: the federation's settings (their defaults are
    this command's, fl.settings) and the rest.

    Defaults: a GroupNorm ConvNet at 32 px; GroupNorm because BatchNorm's batch statistics differ per site and
    per batch (and Opacus rejects it).
    """

    data: str | None = None  # None: the embedded real-image set
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # a user's module:callable model's arguments
    model_state: str | None = None  # a state dict the global model starts from instead of a fresh draw
    norm: str = "group"
    image_size: int = 32
    channels: int = 3
    attack: str | None = None
    attack_rounds: list[int] = field(default_factory=list)
    attack_sites: list[int] = field(default_factory=list)
    attack_batch: int | None = None  # None: attack the site's full update; K: a probe update of its first K images
    attack_settings: dict[str, Any] = field(default_factory=dict)
    engine: str = "inprocess"
    defense: str = "none"  # a defense spec (medpfl.defenses.spec) run at every site in every round (in-process)
    audit_canaries: int = 0  # canaries of a one-run privacy audit (experiments.privacy_audit); 0: no audit
    site_check: bool = True  # sites check every model they receive (fl.model_check); off only to measure it
    # Train equal-sized sites in one vmapped call: "auto" does so on accelerators only. On CPUs sites
    # training side by side on the cores (fl.simulation) are faster (benchmarks/federation_throughput.py)
    # and bit-for-bit the Flower client's arithmetic, where batched kernels round differently.
    vectorise: str = "auto"
    seed: int = 0
    device: str = "auto"  # the GPU when there is one (medpfl.device)


def parse_int_list(text: str | None, option: str) -> list[int]:
    """'1,5,10' or '1-3,8' -> [1, 5, 10] / [1, 2, 3, 8]; a bad list raises naming `option`."""
    values: list[int] = []
    try:
        for part in (text or "").replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            values.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise MedPFLError(f"{option} '{text}' is not a list of integers; write e.g. 1,5,10 or 1-3.") from None
    return sorted(set(values))


def _require_flower() -> None:
    """The Flower engine and Flower itself are importable, or one sentence saying how to install them."""
    try:
        from medpfl.fl.flower import require_flower
        require_flower()
        import medpfl.fl.flower.simulation  # noqa: F401
    except ImportError:
        raise MedPFLError("--engine flower needs Flower; install with pip install -e '.[flower]'.") from None


def _check(config: TrainRunConfig) -> None:
    """Refuse impossible settings before anything is trained or written (the federation's were, when built)."""
    if config.engine not in ENGINES:
        raise MedPFLError(f"--engine must be one of {', '.join(ENGINES)}, got '{config.engine}'.")
    _check_defense(config)
    if config.engine == "flower":
        _require_flower()
    if config.vectorise not in VECTORISE:
        raise MedPFLError(f"--vectorise must be one of {', '.join(VECTORISE)}, got '{config.vectorise}'.")
    if config.audit_canaries and config.engine == "flower" and parse_defense(config.defense).server is None:
        raise MedPFLError("--audit-dp on --engine flower audits client-level DP (--defense cdp:noise=Z), whose canary "
                          "clients join Flower's DP aggregation; audit DP-SGD or a run without DP on --engine "
                          "inprocess.")
    if config.attack is None:
        return
    build_attack(config.attack, **config.attack_settings)  # an unknown attack or setting is named here
    if attack_entry(config.attack).threat.modifies_model and config.audit_canaries:
        raise MedPFLError(f"--audit-dp audits the training of a server that sends the global model; drop it or "
                          f"--attack {config.attack}, a server that sends a model of its own.")
    bad_rounds = [r for r in config.attack_rounds if not 1 <= r <= config.rounds]
    bad_sites = [s for s in config.attack_sites if not 0 <= s < config.sites]
    if not config.attack_rounds or bad_rounds:
        raise MedPFLError(f"--attack-rounds must list rounds between 1 and {config.rounds} (--rounds), "
                          f"e.g. --attack-rounds 1,{config.rounds}.")
    if _securely_aggregated(config):
        if config.attack_sites:
            raise MedPFLError("Under secure aggregation the server sees only the sites' aggregate, which the attack "
                              "takes; drop --attack-sites.")
    elif not config.attack_sites or bad_sites:
        raise MedPFLError(f"--attack-sites must list sites between 0 and {config.sites - 1}, e.g. --attack-sites 0.")
    if config.attack_batch is not None and config.attack_batch < 1:
        raise MedPFLError(f"--attack-batch {config.attack_batch} is invalid; attack 1 or more images.")


def _check_defense(config: TrainRunConfig) -> Chain:
    """The chain `--defense` names, refused where training cannot run it honestly."""
    chain = parse_defense(config.defense)
    if not chain.defenses:
        return chain
    if config.engine == "flower":
        _require_flower()
        from medpfl.defenses.flower import flower_defense

        flower_defense(config.defense, config.protocol)  # what Flower's own parts cannot run is named
    if config.engine == "flower" and chain.channel is not None and len(chain.defenses) > 1:
        raise MedPFLError("On --engine flower, secure aggregation (SecAgg+) runs alone; drop the other defenses "
                          "or use --engine inprocess.")
    if config.engine == "flower" and chain.channel is not None and chain.sites_per_update != config.sites:
        raise MedPFLError(f"On --engine flower, secure aggregation is Flower's SecAgg+ over all sites of a round: "
                          f"write secagg:k={config.sites} (--sites).")
    if config.engine != "flower" and chain.channel is not None:
        raise MedPFLError("--defense secagg: in training, secure aggregation runs on --engine flower (Flower's "
                          "SecAgg+, k = --sites); the in-process curious server sees each site's update.")
    if config.attack_batch is not None:
        raise MedPFLError("--attack-batch attacks a probe update the site never sent, which no defense touched; "
                          "drop it to attack what the defended sites really sent.")
    return chain


def _securely_aggregated(config: TrainRunConfig) -> bool:
    """Whether the server sees only the sites' aggregate (Flower's SecAgg+), never one site's update."""
    return parse_defense(config.defense).channel is not None


def same_images_every_round(config: TrainRunConfig, n_images: list[int]) -> bool:
    """Whether each attacked site's observed update comes from the same images in every round, so that a
    curious server may combine its rounds: the site's whole update (a probe takes its first K images in the
    round's own order) of one step on all its images, which FedSGD's is (DP-SGD's FedSGD step too: all images,
    at rate 1), and FedAvg's when one local batch holds them all, unless DP-SGD Poisson-samples that batch."""
    attacked = [n_images[s] for s in config.attack_sites]
    whole = config.attack_batch is None or all(config.attack_batch >= n for n in attacked)
    one_step = config.protocol == "fedsgd" or (
        all(config.training.steps(n) == 1 for n in attacked) and parse_defense(config.defense).local is None)
    return whole and one_step and not _securely_aggregated(config)


def _images_attacked(config: TrainRunConfig, n_images: list[int]) -> dict[int, int]:
    """Site -> the images behind the update the server attacks (its probe's or all of the site's)."""
    attacked = range(len(n_images)) if _securely_aggregated(config) else config.attack_sites
    return {s: min(config.attack_batch or n_images[s], n_images[s]) for s in attacked}


def several_local_steps(config: TrainRunConfig, n_images: list[int]) -> bool:
    """Whether an attacked update is a FedAvg weight change of several local steps, not one step's gradient."""
    used = _images_attacked(config, n_images)
    return config.protocol == "fedavg" and bool(used) and (config.local_epochs != 1
                                                           or max(used.values()) > config.local_batch)


def unrolls(config: TrainRunConfig, n_images: list[int]) -> bool:
    """Whether the server's attack takes the sites' weight change and their local training (update-inversion;
    the strongest attacker on updates of several local steps), rather than a gradient."""
    return attack_entry(config.attack).unrolls_local_training or (
        config.attack == STRONGEST and several_local_steps(config, n_images))


def _check_attackable(config: TrainRunConfig, n_images: list[int]) -> None:
    """A gradient attack on FedAvg needs updates of one local step (FedSGD-equivalent), else update-inversion
    (which the strongest attacker runs there); multi-round needs the same images behind a site's update in
    every round."""
    if config.attack == MULTI_ROUND and not same_images_every_round(config, n_images):
        raise MedPFLError(f"--attack {MULTI_ROUND} combines rounds of a site behind the same images: use --protocol "
                          "fedsgd (or FedAvg of one local step over all the site's images, without DP-SGD), no "
                          "secure aggregation, and no --attack-batch below the site's image count.")
    if config.attack is None or unrolls(config, n_images):
        return
    if several_local_steps(config, n_images):
        used = _images_attacked(config, n_images)
        site = max(used, key=used.get)
        raise MedPFLError(f"--attack {config.attack} inverts gradients, but site {site}'s FedAvg update of "
                          f"{config.local_epochs} local epoch(s) over {used[site]} images is several steps; it needs "
                          f"the {' or the '.join(unrolling_attacks())} attack (or --local-epochs 1 with --attack-batch "
                          f"at most --local-batch {config.local_batch}, or --protocol fedsgd).")


class CuriousServer:
    """The RoundObserver that attacks the chosen sites' updates and scores them against the site's images.

    Attack code sees only the payload and the observed update; the originals stay here, with the scorer.
    """

    def __init__(self, config: TrainRunConfig, model: torch.nn.Module, sites: list[tuple[torch.Tensor, torch.Tensor]],
                 num_classes: int, item_ids: list[list[str]], out: Path):
        self.config, self.model, self.sites, self.num_classes = config, model, sites, num_classes
        self.item_ids, self.out = item_ids, out
        self.attack = build_attack(config.attack, **config.attack_settings)
        self.pending: list[SiteObservation] = []
        # Where the attack combines rounds and each site's images are the same in every round, the server keeps
        # every round's observation of the attacked sites (not only the attacked rounds'), site -> in round order.
        # A resumed run keeps those since it resumed: each result names the rounds it combined.
        self.keeps_rounds = attack_entry(config.attack).combines_rounds and same_images_every_round(
            config, [len(y) for _, y in sites])
        self.unrolls = unrolls(config, [len(y) for _, y in sites])
        self.history: dict[int, list[SiteObservation]] = {}
        # The defense the server configured its sites with (DP-SGD as calibrated for this run): what a
        # defense-aware attack may know. Set by run_training once the defended federation is built.
        self.defense = Chain(())
        # A malicious server's note per round of what the sites' check says of the model it sent.
        self.site_checks: dict[int, str | None] = {}

    def wants(self, round_index: int, site: int) -> bool:
        # AGGREGATE: all a server under secure aggregation is ever handed
        if self.keeps_rounds and site in self.config.attack_sites:
            return True
        return round_index in self.config.attack_rounds and (site in self.config.attack_sites or site == AGGREGATE)

    def observe(self, seen: SiteObservation) -> None:
        if self.keeps_rounds:
            self.history.setdefault(seen.facts.site, []).append(seen)
        if seen.facts.round in self.config.attack_rounds:
            self.pending.append(seen)  # attacked after the round, so a slow attack never holds up aggregation

    def attack_pending(self) -> list[dict[str, Any]]:
        """Attack and score every update observed since the last call; one result per site and round.

        Updates of one round behind equally many images are attacked together, as one vectorised batch of
        victims (the attack engine's way), so attacking five sites costs little more than attacking one.
        """
        groups: dict[tuple[int, int], list[tuple]] = {}
        for seen in self.pending:
            view = self._view(seen)
            groups.setdefault((seen.facts.round, len(view[3])), []).append((seen, *view))
        self.pending = []
        results = [r for (round_index, _), group in groups.items() for r in self._attack(round_index, group)]
        return sorted(results, key=lambda r: (r["round"], r["site"]))

    def _view(self, seen: SiteObservation) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor,
                                                    torch.Tensor, str]:
        """(update the attacker inverts, extra payload fields, the images and labels behind it, which update)."""
        facts, training = seen.facts, seen.facts.training
        x, y = self._behind(facts)
        update, observed = seen.update, "aggregate" if facts.site == AGGREGATE else "sent"
        if self.config.attack_batch is not None and self.config.attack_batch < len(y):
            # A probe: the update this site would have sent from only its first K images this round.
            x, y = x[:self.config.attack_batch], y[:self.config.attack_batch]
            architecture = received_architecture(self.model, seen.weights, tuple(x.shape[1:]))
            update = local_update(architecture, seen.weights, x, y, self.num_classes, training)
            observed = "probe"
        if self.unrolls:
            # The server configured the sites' local training, so the attack is granted it with the weights.
            return update, {"local_training": training}, x, y, observed
        if training.protocol == "fedavg":  # one local step (checked before training): the update is -lr x gradient
            update = {n: -u / training.lr for n, u in update.items()}
        return update, {}, x, y, observed

    def _sites_behind(self, facts: SiteRound) -> list[int]:
        """The sites whose images are behind an observed update: one, or every site behind an aggregate."""
        return list(range(len(self.sites))) if facts.site == AGGREGATE else [facts.site]

    def _behind(self, facts: SiteRound) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels behind an observed update, in the order the site(s) visited them."""
        parts = [ordered(*self.sites[s], facts.seed, facts.round, s) for s in self._sites_behind(facts)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def _items_behind(self, facts: SiteRound) -> list[str]:
        """The item ids of `_behind`'s images, in the same order."""
        return [self.item_ids[s][i] for s in self._sites_behind(facts)
                for i in site_order(facts.seed, facts.round, s, len(self.item_ids[s])).tolist()]

    def _payload_and_update(self, group: list[tuple]) -> tuple[ServerPayload, ObservedUpdate]:
        """What the attacker holds of the sites of `group` ((observation, *_view) each), stacked over them."""
        y = torch.stack([g[4] for g in group])
        granted = y if attack_entry(self.config.attack).threat.knows_labels else None
        weights = {n: torch.stack([g[0].weights[n] for g in group]) for n in group[0][0].weights}
        image_shape = tuple(group[0][3].shape[1:])
        architecture = received_architecture(self.model, group[0][0].weights, image_shape)
        payload = ServerPayload(architecture, weights, self.num_classes,
                                image_shape, "train", **group[0][2], defense=self.defense)
        return payload, ObservedUpdate({n: torch.stack([g[1][n] for g in group]) for n in group[0][1]}, y.shape[1],
                                       labels=granted)

    def _rounds_kept(self, round_index: int, group: list[tuple]) -> list[int]:
        """The rounds up to `round_index` observed of every site of `group` (only this one unless the server keeps
        rounds)."""
        if not self.keeps_rounds:
            return [round_index]
        kept = [{h.facts.round for h in self.history.get(g[0].facts.site, ())} for g in group]
        return sorted(r for r in set.intersection(*kept) if r <= round_index)

    def _attack(self, round_index: int, group: list[tuple]) -> list[dict[str, Any]]:
        """One vectorised attack on the sites of `group` (same round, same number of images), scored per site;
        an attack that combines rounds gets every round kept of them."""
        seen_all = [g[0] for g in group]
        # The aggregate's stream key is the number of sites (seed keys must be non-negative).
        sites = [len(self.sites) if s.facts.site == AGGREGATE else s.facts.site for s in seen_all]
        generator = torch.Generator().manual_seed(torch_seed(self.config.seed, ATTACK, round_index, *sites))
        rounds = self._rounds_kept(round_index, group)
        if len(rounds) > 1:
            by_round = [[next(h for h in self.history[s.facts.site] if h.facts.round == r) for s in seen_all]
                        for r in rounds[:-1]]
            held = [self._payload_and_update([(h, *self._view(h)) for h in seen]) for seen in by_round]
            held.append(self._payload_and_update(group))
            result = self.attack.reconstruct_rounds([p for p, _ in held], [u for _, u in held], generator)
        else:
            result = self.attack.reconstruct(*self._payload_and_update(group), generator)
        combined = self.config.attack == MULTI_ROUND or MULTI_ROUND in result.extra.get("candidates", {})
        folder = self.out / "attacks"
        folder.mkdir(exist_ok=True)
        results = []
        for j, (seen, _, _, images, labels, observed) in enumerate(group):
            facts = seen.facts
            record, matched = victim_record(images, labels, result, j, self._items_behind(facts)[:len(labels)],
                                            len(group))
            for b in range(len(labels)):
                save_png(matched[b], attacked_png(folder, facts.round, facts.site, b))
            results.append({"round": facts.round, "site": facts.site, "victim": facts.site, "observed": observed,
                            **record, "asr": sum(v >= SUCCESS_SSIM for v in record["ssim"]) / len(record["ssim"]),
                            **({"rounds_combined": rounds} if combined else {}),
                            **({"site_check": self.site_checks[facts.round]} if facts.round in self.site_checks
                               else {})})
        return results


def _load(source, items, config: TrainRunConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ImageDataset(source, list(items), size=config.image_size, channels=config.channels)
    x, y = dataset.load_batch(range(len(items)))
    return x.to(device), y.to(device)


def _save_atomic(obj: Any, file: Path) -> None:
    tmp = file.with_suffix(file.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, file)


@contextmanager
def _refusal_kept(path: Path) -> Iterator[None]:
    """Where the sites refuse the model the server sent, the run ends: their reason is kept for the report."""
    try:
        yield
    except ModelRefused as refused:
        write_json(path / REFUSAL, {"round": refused.round, "reason": str(refused)})
        raise


def _prepare_dir(out: Path, record: dict[str, Any], resume: bool) -> tuple[Path, int, dict[str, Any] | None]:
    """Open the run directory; (path, last finished round, its saved state) when resuming, else (path, 0, None)."""
    config_file = out / "config.json"
    if resume and (out / STATE).exists() and config_file.exists():
        previous = json.loads(config_file.read_text()).get("config", {})
        if previous != record:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise MedPFLError(f"'{out}' holds a training run with other settings ({', '.join(changed)}); pass a new "
                              "--out, the same settings to resume it, or --fresh to start over.")
    if not resume:
        for name in (STATE, ROUNDS, ATTACKS_FILE, MODEL, AUDIT_FILE, REFUSAL):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "attacks", ignore_errors=True)
    path = open_run_dir(out, record, resume=resume)
    if not (path / STATE).exists():
        for name in (ROUNDS, ATTACKS_FILE):  # results without a saved state belong to no finished round
            (path / name).unlink(missing_ok=True)
        return path, 0, None
    state = torch.load(path / STATE, weights_only=True)
    done = int(state["round"])
    # Lines written after the last saved state (a kill between writing them and saving it) are redone.
    for name in (ROUNDS, ATTACKS_FILE):
        lines = read_jsonl(path / name)
        rewrite_jsonl(path / name, [line for line in lines if line["round"] <= done])
    return path, done, state


def run_training(config: TrainRunConfig, out: str | Path, resume: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 defenses: RoundHooks | None = None, strict: bool = False,
                 checking: Callable[[int, int], None] | None = None,
                 on_skipped: Callable[[list[Skipped]], None] | None = None,
                 chain: Chain | None = None) -> dict[str, Any]:
    """Train (or resume) the federation described by `config` into `out`; returns the summary.

    `defenses` supplies the site transform and aggregator of every round (default: none, FedAvg); the
    curious server's observer is added to its observers. What it does must be recorded in `config`.
    Broken files of the source are left out of every site and the test set, as `medpfl attack` does
    (`data.open_verified`): named to `on_skipped`, listed in skipped.json, or refused with `strict`.
    `chain` runs instead of the one config.defense names (a test's deliberately broken mechanism, say).
    """
    _check(config)
    if defenses is not None and config.defense != "none":
        raise ValueError("Give the defense either as config.defense or as `defenses` hooks, not both.")
    device = resolve_device(config.device)
    source, skipped = open_verified(config.data, strict, checking, on_skipped)
    federation = keep_per_site(federate(source, config.sites, config.partition, config.seed), config.site_images,
                               config.seed)
    num_classes = len(federation.classes)
    _check_attackable(config, federation.n_images)
    record = asdict(config)
    if not config.audit_canaries:
        del record["audit_canaries"]  # so runs recorded before audits existed still resume
    if config.site_check:
        del record["site_check"]  # likewise: only a run whose sites trained unchecked records it
    path, done, state = _prepare_dir(Path(out), record, resume)
    write_skipped(path, skipped)
    write_json(path / "federation.json", {"classes": list(federation.classes), "n_images": federation.n_images,
                                          "label_counts": federation.label_counts(), "n_test": len(federation.test),
                                          "device_used": str(device)})
    net = build_model(config.model, num_classes, config.channels, config.image_size, norm=config.norm,
                      seed=model_seed(config.seed), model_kwargs=config.model_kwargs)
    if config.model_state:
        load_model_state(net, config.model_state, f"--model {config.model} with {num_classes} classes, "
                         f"{config.channels} channels at {config.image_size} px")
    net = net.to(device)
    model = functional_model(net)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {n: w.to(device) for n, w in (state["weights"] if state else initial).items()}
    sites = [_load(source, items, config, device) for items in federation.sites]
    test = _load(source, federation.test, config, device)
    chain = chain or parse_defense(config.defense)
    privacy_audit = None
    if config.audit_canaries:
        privacy_audit = PrivacyAudit(config.audit_canaries, chain, sites, initial, config.training, config.seed)
        privacy_audit.resume(state, path / STATE)
        chain = privacy_audit.chain
    server = (CuriousServer(config, model, sites, num_classes, [[it.item_id for it in s] for s in federation.sites],
                            path) if config.attack else None)
    if server:
        server.defense = chain
    base = defenses or RoundHooks()
    hooks = RoundHooks(base.site_transform, base.aggregate, [*base.observers, *([server] if server else []),
                                                             *(privacy_audit.observers if privacy_audit else ())])
    if progress:
        progress(done, config.rounds)

    def finished(round_index: int, new: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """After a round: attack what was observed, record the round, then save the state to resume from."""
        started = time.perf_counter()
        for result in server.attack_pending() if server else []:
            append_jsonl(path / ATTACKS_FILE, result)
        append_jsonl(path / ROUNDS, {"round": round_index, **record, "attack_seconds": time.perf_counter() - started})
        _save_atomic({"round": round_index, "weights": {n: w.detach().cpu() for n, w in new.items()},
                      **(privacy_audit.state() if privacy_audit else {})}, path / STATE)
        if progress:
            progress(round_index, config.rounds)

    tamper = None
    if server and attack_entry(config.attack).threat.modifies_model:
        # The server reads the sites' aggregate under secure aggregation, else each attacked site's own update.
        secure = _securely_aggregated(config)
        behind = (sum(federation.n_images) if secure else max(federation.n_images[s] for s in config.attack_sites))
        tamper = MaliciousServer(server.attack, model, tuple(test[0].shape[1:]), test[0], config.attack_rounds,
                                 behind)
        if secure:
            for_secure_aggregation(server.attack, config.attack_settings)
        server.site_checks = tamper.verdicts  # filled as the model of each attacked round is sent
    if config.engine == "flower" and done < config.rounds:
        with _refusal_kept(path):
            weights = _train_on_flower(config, hooks, weights, done, finished, privacy_audit, tamper)
    elif done < config.rounds:
        vectorise = config.vectorise == "on" or (config.vectorise == "auto" and device.type != "cpu")
        # The sites verify every model they receive against the architecture they built themselves.
        check = ModelCheck(fingerprint(dict(model.named_parameters()))) if config.site_check else None
        defended = (DefendedFederation(chain, model, sites, num_classes, config.training, config.rounds, config.seed,
                                       tuple(hooks.observers), vectorise, check, tamper) if chain.defenses else None)
        if server and defended:
            server.defense = Chain(tuple(defended.dp if d.stage == "local" else d for d in chain.defenses))
        audited = privacy_audit and privacy_audit.federation(model, num_classes, config.training, config.seed, hooks,
                                                             check)
        engine = defended or audited or InProcessFederation(model, sites, num_classes, config.training, config.seed,
                                                            hooks, vectorise, model_check=check, tamper=tamper)
        if defended:
            defended.resume(done)
        for round_index in range(done + 1, config.rounds + 1):
            with _refusal_kept(path):
                outcome = engine.run_round(weights, round_index)
            weights = outcome.weights
            privacy = defended.privacy_record() if defended else {}  # over every round so far
            finished(round_index, weights, {**evaluate(model, weights, *test), "seconds": outcome.seconds,
                                            "update_norms": outcome.update_norms, "n_images": outcome.n_images,
                                            **privacy})
    if privacy_audit is not None and done < config.rounds:
        write_json(path / AUDIT_FILE, privacy_audit.result(weights))
    net.load_state_dict({n: w.cpu() for n, w in weights.items()}, strict=False)
    _save_atomic({k: v.cpu() for k, v in net.state_dict().items()}, path / MODEL)
    return summarise(path, federation, test[1], num_classes, config)


def _train_on_flower(config: TrainRunConfig, hooks: RoundHooks, weights: dict[str, torch.Tensor], done: int,
                     finished: Callable[[int, dict[str, torch.Tensor], dict[str, Any]], None],
                     privacy_audit: PrivacyAudit | None = None,
                     tamper: MaliciousServer | None = None) -> dict[str, torch.Tensor]:
    """Rounds done+1.. on Flower's simulation runtime (the optional extra), with the same sites, seed and hooks;
    a privacy audit's canary clients join the aggregation that Flower's DP wrapper noises, and a malicious
    server (`tamper`) sends the models it crafts."""
    _require_flower()
    from medpfl.defenses.flower import flower_parts
    from medpfl.fl.flower.federation import FederationSpec
    from medpfl.fl.flower.simulation import run_simulation

    # Under SecAgg+ the server never learns a site's update norm: those keys are missing there.
    keys = ("accuracy", "balanced_accuracy", "auc", "seconds", "update_norms", "n_images")
    secure = _securely_aggregated(config)
    if secure and done:
        raise MedPFLError(f"A secure-aggregation run on Flower starts at round 1 and cannot resume after round {done}; "
                          "rerun with --fresh.")
    start = None if secure else {n: w.cpu() for n, w in weights.items()}  # SecAgg+: the run's initial model
    parts = flower_parts(parse_defense(config.defense), config.seed, config.sites)
    if parts.aggregate is not None:
        aggregate = privacy_audit.flower_aggregate() if privacy_audit else parts.aggregate
        hooks = RoundHooks(hooks.site_transform, aggregate, hooks.observers)
    result = run_simulation(FederationSpec.of(config), hooks, start, done + 1,
                            lambda record, new: finished(record["round"], new,
                                                         {**{k: record[k] for k in keys if k in record},
                                                          **_flower_privacy(config, record["round"])}),
                            secure_aggregation=secure, client_mods=parts.client_mods,
                            wrap_strategy=parts.wrap_strategy, tamper=tamper, site_check=config.site_check)
    return result.weights


def _flower_privacy(config: TrainRunConfig, rounds_done: int) -> dict[str, Any]:
    """Client-level DP's epsilon over the rounds so far (every site in every round); nothing for the rest."""
    server = parse_defense(config.defense).server
    return {} if server is None else {"epsilon": server.epsilon(rounds_done, 1, 1)}


def summarise(path: Path, federation: Federation, test_labels: torch.Tensor, num_classes: int,
              config: TrainRunConfig) -> dict[str, Any]:
    """The last round's utility with its chance level, the attacks' mean scores per round, and over every
    attacked image their re-identification and chance levels (as `medpfl attack` scores them)."""
    rounds = read_jsonl(path / ROUNDS)
    attacks = read_jsonl(path / ATTACKS_FILE)
    last = rounds[-1]
    summary = {
        "rounds": len(rounds), "sites": len(federation.sites), "partition": federation.partition,
        "n_images": federation.n_images, "n_test": len(federation.test),
        "final": {k: last[k] for k in ("accuracy", "balanced_accuracy", "auc")},
        "epsilon": last.get("epsilon"),  # over the whole run, the worst-off site's, where the defense gives one
        **{k: last[k] for k in ("epsilon_per_site", "dp_delta", "noise_multiplier") if k in last},
        "chance": chance_levels(test_labels.cpu().numpy(), num_classes),
        "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
        "attacks": [{k: a[k] for k in ("round", "site", "observed", "asr")} | {
            "mean_ssim": sum(a["ssim"]) / len(a["ssim"]), "mean_psnr": sum(a["psnr"]) / len(a["psnr"]),
            "images": len(a["ssim"]), **rate_interval(a["asr"], len(a["ssim"])).as_dict("asr"),
            "label_accuracy": sum(a["label_correct"]) / len(a["label_correct"]),  # scored per image
            **wilson(sum(a["label_correct"]), len(a["label_correct"])).as_dict("label_accuracy")} for a in attacks],
    }
    attacks = sorted(attacks, key=lambda a: (a["round"], a["site"]))  # the report's order of attacked images
    if attacks and all(len(a.get("items") or []) == len(a["ssim"]) for a in attacks):
        reid, gallery, guess = reidentification(path, attacks, config.data, config.image_size, config.channels,
                                                config.seed)
        summary |= {"reidentified": reid, "reid_rate": sum(reid) / len(reid),
                    **wilson(sum(reid), len(reid)).as_dict("reid_rate"),
                    "reid_gallery_size": gallery, "reid_chance": 1 / gallery,
                    # an attacker answering with a random image of the data: a low SSIM may be no leak at all
                    "asr_chance": float((guess >= SUCCESS_SSIM).float().mean()),
                    "mean_ssim_chance": float(guess.mean()), "success_ssim": SUCCESS_SSIM}
    if (path / AUDIT_FILE).exists():  # measured (lower, 95%) beside the accountant's (upper) epsilon
        summary["dp_audit"] = compare(json.loads((path / AUDIT_FILE).read_text()), summary["epsilon"])
    write_json(path / "summary.json", summary)
    return summary


def reidentification(path: Path, attacks: list[dict[str, Any]], data: str | None, image_size: int, channels: int,
                     seed: int) -> tuple[list[bool], int, torch.Tensor]:
    """Per attacked image of a training run, whether its reconstruction is nearest (SSIM) to its own original
    among the attacked images and others of the source (as `medpfl attack` scores it); the gallery's size; and
    each attacked image's SSIM to another gallery image at random, what an attacker answering at random reaches."""
    from medpfl.data import sample_items
    from medpfl.experiments.attack_run import AttackRunConfig, _random_guess_ssim
    from medpfl.metrics.privacy import reidentified
    from medpfl.report.images import load_png

    source = open_verified(data)[0]
    attacked = [i for a in attacks for i in a["items"]]
    unique = list(dict.fromkeys(attacked))  # an image attacked in the first and last round is one patient
    seen = set(unique)
    others = [it for it in source.items if it.item_id not in seen]
    room = max(AttackRunConfig.reid_gallery - len(unique), 0)  # the gallery's size as `medpfl attack` bounds it
    extra = sample_items(others, min(room, len(others)), seed + 1)
    by_id = {it.item_id: it for it in source.items}
    gallery_items = [by_id[i] for i in unique] + extra
    dataset = ImageDataset(source, gallery_items, size=image_size, channels=channels)
    gallery = torch.stack([dataset.image(i) for i in range(len(gallery_items))])
    recons = torch.stack([load_png(attacked_png(path / "attacks", a["round"], a["site"], b), gallery.shape[1])
                          for a in attacks for b in range(len(a["items"]))])
    reid = reidentified(recons, torch.tensor([unique.index(i) for i in attacked]), gallery).tolist()
    return reid, len(gallery), _random_guess_ssim(gallery[:len(unique)], gallery, seed)

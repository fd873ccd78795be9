"""The Flower ServerApp: FedAvg with the curious server's seat, and the global model's utility per round.

`AuditorFedAvg.aggregate_train` receives every site's reply before aggregating, exactly what a real
Flower server receives, hands the chosen sites' updates to the observers of fl.rounds.RoundHooks (an
attack, or a recorder), and aggregates with the hooks' aggregator, as the in-process engine does.

A malicious server (`tamper`) may send another model than the global one: it describes the architecture in
the round's config (fl.flower.federation.received_model) and sends its weights. Sites that refuse it
(fl.flower.model_check_mod) answer with an error reply; the server then sends nothing more and the run
ends with their reason (FlowerRun.refusals), as under SecAgg+ (fl.flower.secagg).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from medpfl.fl.flower.client_app import ROUND_KEY, array_record, tensors
from medpfl.fl.flower.federation import AGGREGATE, IMPRINT_BINS_KEY, FederationSpec, federation_data, global_model
from medpfl.fl.gradients import functional_model
from medpfl.fl.rounds import RoundHooks, SiteObservation, SiteRound, Tamper, Update, next_global, update_norm
from medpfl.models.imprint import imprint_bins
from medpfl.fl.utility import evaluate

def _count_examples(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    # The sites' metrics are their index and image count; averaging the index would mean nothing.
    return MetricRecord({weighted_by_key: sum(int(c["metrics"][weighted_by_key]) for c in contents)})


class AuditorFedAvg(FedAvg):
    """FedAvg whose server looks at each site's update (via `hooks.observers`) before aggregating it."""

    def __init__(self, spec: FederationSpec, hooks: RoundHooks | None = None, first_round: int = 1,
                 tamper: Tamper | None = None, **fedavg_options) -> None:
        super().__init__(train_metrics_aggr_fn=_count_examples, **fedavg_options)
        self.spec, self.hooks, self.first_round, self.tamper = spec, hooks or RoundHooks(), first_round, tamper
        self.sent: Update = {}
        self.last_round: dict = {}
        self.refusals: list[str] = []  # the sites' reasons, once they refused a model the server sent
        self.refused_round: int | None = None

    def run_round(self, server_round: int) -> int:
        """The run's round index of Flower's `server_round` (they differ when a run resumes)."""
        return self.first_round + server_round - 1

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.refusals:  # the sites would refuse the same model again
            return []
        self.sent = tensors(arrays)  # the payload every site of this round trains from
        config[ROUND_KEY] = self.run_round(server_round)
        crafted = self.tamper(config[ROUND_KEY], self.sent) if self.tamper is not None else None
        if crafted is not None:
            self.sent, arrays = crafted, array_record(crafted)
        config[IMPRINT_BINS_KEY] = imprint_bins(self.sent)  # the architecture the sites build (0: the agreed one)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        if self.refusals:
            return None, None
        valid, failed = self._check_and_log_replies(list(replies), is_train=True)
        refused = [m.error.reason for m in failed if m.error.code == ErrorCode.MOD_FAILED_PRECONDITION]
        if refused:  # the sites' model check (fl.flower.model_check_mod) turned the model down
            self.refusals, self.refused_round = list(dict.fromkeys(refused)), self.run_round(server_round)
            return None, None
        if failed or len(valid) != self.spec.sites:
            raise RuntimeError(f"Round {self.run_round(server_round)}: {len(valid)} of {self.spec.sites} sites "
                               "replied; FedAvg over fewer sites would not be the configured federation.")
        valid.sort(key=lambda m: int(m.content["metrics"]["site"]))
        updates, n_images = [], []
        for msg in valid:
            site, n = int(msg.content["metrics"]["site"]), int(msg.content["metrics"][self.weighted_by_key])
            update = tensors(msg.content["arrays"])
            self.hooks.notify(SiteRound(self.run_round(server_round), site, n, self.spec.training, self.spec.seed),
                              self.sent, update)
            updates.append(update)
            n_images.append(n)
        aggregated = self.hooks.aggregate({n: torch.stack([u[n] for u in updates]) for n in self.sent}, n_images)
        new = next_global(self.sent, aggregated, self.spec.protocol, self.spec.lr)
        self.last_round = {"update_norms": [update_norm(u) for u in updates], "n_images": n_images,
                           "aggregate_seconds": time.perf_counter() - started}
        return array_record(new), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


@dataclass
class FlowerRun:
    """What a finished Flower run leaves: the final global weights and one record per round."""

    weights: Update = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # why sites refused the model the server sent, if they did
    refused_round: int | None = None


RoundCallback = Callable[[dict, Update], None]  # (the round's record, its new global weights)
StrategyWrapper = Callable[[FedAvg], Any]  # the auditor -> the strategy the ServerApp runs (a defense's wrapper)


def run_federation(grid: Grid, spec: FederationSpec, hooks: RoundHooks | None = None,
                   weights: Update | None = None, first_round: int = 1, on_round: RoundCallback | None = None,
                   result: FlowerRun | None = None, wrap_strategy: StrategyWrapper | None = None,
                   tamper: Tamper | None = None) -> FlowerRun:
    """Rounds `first_round`..`spec.rounds` of FedAvg over the grid's nodes (one per site) from `weights`
    (default: the run's initial model), scoring the global model on the test set after each round; `tamper`
    is a malicious server's choice of what to send (default: the global model)."""
    result = result if result is not None else FlowerRun()
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    if weights is None:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = AuditorFedAvg(spec, hooks, first_round, tamper, fraction_evaluate=0.0, min_train_nodes=spec.sites,
                             min_available_nodes=spec.sites)
    running = wrap_strategy(strategy) if wrap_strategy else strategy  # e.g. Flower's DP wrapper
    clock = [time.perf_counter()]

    def score(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or strategy.refusals:  # the run records finished rounds only
            clock[0] = time.perf_counter()
            return None
        new = tensors(arrays)
        utility = evaluate(model, new, *data.test)
        record = {"round": strategy.run_round(server_round), **utility,
                  "seconds": time.perf_counter() - clock[0], **strategy.last_round}
        result.rounds.append(record)
        if on_round is not None:
            on_round(record, new)
        clock[0] = time.perf_counter()
        return MetricRecord({k: v for k, v in utility.items() if v == v})  # NaN (AUC of one class) is left out

    final = running.start(grid=grid, initial_arrays=array_record(weights), num_rounds=spec.rounds - first_round + 1,
                           train_config=ConfigRecord(spec.to_config()), evaluate_fn=score)
    result.weights = tensors(final.arrays)
    result.refusals, result.refused_round = strategy.refusals, strategy.refused_round
    return result


def server_app(spec: FederationSpec, hooks: RoundHooks | None = None, weights: Update | None = None,
               first_round: int = 1, on_round: RoundCallback | None = None, result: FlowerRun | None = None,
               wrap_strategy: StrategyWrapper | None = None, tamper: Tamper | None = None) -> ServerApp:
    """A ServerApp for an in-Python run (simulation): `result` receives the final weights and per-round records."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, spec, hooks, weights, first_round, on_round, result, wrap_strategy, tamper)

    return server


class ObservationRecorder:
    """A curious server that keeps what it saw: one file per observed site and round, for attacks afterwards."""

    def __init__(self, folder: Path, rounds: Iterable[int] | None = None, sites: Iterable[int] | None = None):
        self.folder = folder
        self.rounds = None if rounds is None else set(rounds)
        self.sites = None if sites is None else set(sites)

    def wants(self, round_index: int, site: int) -> bool:
        return (self.rounds is None or round_index in self.rounds) and (self.sites is None or site in self.sites)

    def observe(self, seen: SiteObservation) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        facts = seen.facts
        who = "aggregate" if facts.site == AGGREGATE else f"site{facts.site:03d}"
        torch.save({"round": facts.round, "site": facts.site, "n_images": facts.n_images, "weights": seen.weights,
                    "update": seen.update}, self.folder / f"round{facts.round:04d}-{who}.pt")


def deployment_settings(context: Context) -> tuple[FederationSpec, RoundHooks, RoundCallback]:
    """From a Flower App's run config: the spec, a recorder of the audited rounds (into `out/observed/`),
    and a callback writing `out/rounds.jsonl` and `out/global_model.pt` as rounds finish."""
    config = dict(context.run_config)
    out = Path(str(config.get("out", "flower-run")))
    audit_rounds = [int(r) for r in str(config.get("audit-rounds", "")).replace(",", " ").split()]
    out.mkdir(parents=True, exist_ok=True)
    hooks = RoundHooks(observers=[ObservationRecorder(out / "observed", audit_rounds)] if audit_rounds else [])

    def finished(record: dict, weights: Update) -> None:
        # The model first, replaced whole: a round's line then always has its model on disk.
        torch.save(weights, out / "global_model.pt.tmp")
        os.replace(out / "global_model.pt.tmp", out / "global_model.pt")
        with (out / "rounds.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    return FederationSpec.from_config(config), hooks, finished


# The ServerApp that `flwr run` starts in deployments (see fl.flower.deploy.write_app).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec, hooks, finished = deployment_settings(context)
    run_federation(grid, spec, hooks, on_round=finished)

"""The Flower ServerApp: FedAvg with the curious server's seat, and utility of the global model per round.

`AuditorFedAvg.aggregate_train` receives every site's reply before aggregating, exactly what a real
Flower server receives, and hands the chosen rounds and sites to an observer (an attack, or a recorder)
before the sample-weighted average.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from medpfl.fl.flower.client_app import arrays_to_tensors
from medpfl.fl.flower.federation import (
    FederationSpec, Observer, SiteReply, accuracy, aggregate, federation_data, global_model,
)
from medpfl.fl.local import LocalTraining


class AuditorFedAvg(FedAvg):
    """FedAvg whose server looks at each site's update (chosen rounds and sites) before averaging by image count."""

    def __init__(self, training: LocalTraining, observer: Observer | None = None,
                 audit_rounds: Iterable[int] | None = None, audit_sites: Iterable[int] | None = None,
                 **fedavg_options) -> None:
        super().__init__(**fedavg_options)
        self.training = training
        self.observer = observer
        self.audit_rounds = None if audit_rounds is None else set(audit_rounds)
        self.audit_sites = None if audit_sites is None else set(audit_sites)
        self._sent: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays_to_tensors(arrays)  # the payload every site of this round trains from
        return super().configure_train(server_round, arrays, config, grid)

    def audits(self, server_round: int, site: int) -> bool:
        """Whether the observer sees `site`'s update of `server_round`."""
        return (self.observer is not None
                and (self.audit_rounds is None or server_round in self.audit_rounds)
                and (self.audit_sites is None or site in self.audit_sites))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        site_replies = []
        for msg in sorted(valid, key=lambda m: int(m.content["metrics"]["site"])):
            metrics = msg.content["metrics"]
            site_replies.append(SiteReply(server_round, int(metrics["site"]), self._sent,
                                          arrays_to_tensors(msg.content["arrays"]), int(metrics[self.weighted_by_key])))
        for reply in site_replies:
            if self.audits(server_round, reply.site):
                self.observer(reply)
        new_weights = aggregate(self._sent, [r.update for r in site_replies],
                                [r.num_examples for r in site_replies], self.training)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord({n: w.contiguous() for n, w in new_weights.items()}), metrics


@dataclass
class FlowerRun:
    """What a finished Flower run leaves: final global weights and one record per round."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


def run_federation(grid: Grid, spec: FederationSpec, observer: Observer | None = None,
                   audit_rounds: Iterable[int] | None = None, audit_sites: Iterable[int] | None = None,
                   result: FlowerRun | None = None, site_evaluation: bool = False,
                   on_round=None) -> FlowerRun:
    """Run `spec.rounds` rounds of FedAvg over the grid's nodes (one per site), scoring the global model each round."""
    result = result if result is not None else FlowerRun()
    data = federation_data(spec)
    model = global_model(spec, data.num_classes)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = AuditorFedAvg(spec.training, observer, audit_rounds, audit_sites,
                             fraction_evaluate=1.0 if site_evaluation else 0.0,
                             min_train_nodes=spec.sites, min_available_nodes=spec.sites,
                             min_evaluate_nodes=spec.sites if site_evaluation else 0)
    started = [time.perf_counter()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = arrays_to_tensors(arrays)
        scores = accuracy(model, weights, *data.test)
        if server_round > 0:
            record = {"round": server_round, **scores, "seconds": time.perf_counter() - started[0]}
            result.rounds.append(record)
            if on_round is not None:
                on_round(record, weights)
        started[0] = time.perf_counter()
        return MetricRecord(scores)

    final = strategy.start(grid=grid, initial_arrays=ArrayRecord({n: w.contiguous() for n, w in initial.items()}),
                           num_rounds=spec.rounds, train_config=ConfigRecord(spec.to_config()),
                           evaluate_config=ConfigRecord(spec.to_config()), evaluate_fn=evaluate)
    result.weights = arrays_to_tensors(final.arrays)
    return result


def server_app(spec: FederationSpec, observer: Observer | None = None, audit_rounds: Iterable[int] | None = None,
               audit_sites: Iterable[int] | None = None, result: FlowerRun | None = None) -> ServerApp:
    """A ServerApp for an in-Python run (simulation): `result` receives the final weights and per-round scores."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, spec, observer, audit_rounds, audit_sites, result)

    return server


# The ServerApp that `flwr run` starts (deployments): the spec comes from the run config, and the curious
# server records what it observes under `out` so an attack can be run on it afterwards.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    out = Path(str(config.pop("out", "flower-run")))
    audit_rounds = _int_list(config.pop("audit-rounds", ""))
    spec = FederationSpec.from_config(config)
    (out / "observed").mkdir(parents=True, exist_ok=True)

    def record(reply: SiteReply) -> None:
        torch.save({"weights": reply.weights, "update": reply.update, "num_examples": reply.num_examples,
                    "round": reply.round, "site": reply.site},
                   out / "observed" / f"round{reply.round}-site{reply.site}.pt")

    def finished_round(record_line: dict, weights: dict[str, torch.Tensor]) -> None:
        with (out / "rounds.jsonl").open("a") as fh:
            fh.write(json.dumps(record_line) + "\n")
        torch.save(weights, out / "global_model.pt")

    run_federation(grid, spec, record, audit_rounds or None, None, on_round=finished_round)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in str(text).replace(",", " ").split()]

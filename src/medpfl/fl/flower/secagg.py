"""Secure aggregation on Flower: SecAgg+ between the sites, so the curious server receives only their aggregate.

In flwr 1.42, SecAgg+ exists only in the legacy API: `secaggplus_mod` on the ClientApp and
`SecAggPlusWorkflow` inside a `DefaultWorkflow` with a legacy strategy. The sites mask their updates
pairwise; the server unmasks only the sum, so `aggregate_fit` holds the sample-weighted mean of all
sites' updates (quantized and clipped to +-`clipping_range`, as the protocol's integer arithmetic needs)
and never one site's. Observers are handed that mean once per round as site `AGGREGATE` (-1).

Every site checks the model it receives before SecAgg+ sees its update (fl.flower.model_check_mod, first
of the mods). A malicious server (`tamper`) may send another model than the global one: it describes the
architecture in the round's config (fl.flower.federation.received_model) and sends its weights; when the
sites refuse it, SecAgg+ halts and the run ends with their reason (FlowerRun.refusals).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

from medpfl.fl.flower.client_app import ROUND_KEY
from medpfl.fl.flower.federation import (AGGREGATE, IMPRINT_BINS_KEY, FederationSpec, federation_data, global_model,
                                        received_model)
from medpfl.fl.flower.model_check_mod import model_check_mod
from medpfl.fl.flower.server_app import FlowerRun, RoundCallback, deployment_settings
from medpfl.fl.gradients import functional_model
from medpfl.fl.rounds import RoundHooks, SiteRound, Tamper, Update, next_global, site_update
from medpfl.fl.utility import evaluate
from medpfl.models.imprint import imprint_bins
from medpfl.seeds import SECAGG_ROUNDING, numpy_global_seed

# What the protocol's integer arithmetic can carry: updates are clipped to +-CLIPPING_RANGE (weight changes
# and gradients of the zoo's models stay far inside it) and quantized to 2**22 levels over that range.
CLIPPING_RANGE = 8.0


def _to_tensors(names: list[str], parameters: Parameters) -> Update:
    arrays = parameters_to_ndarrays(parameters)
    return {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(names, arrays)}


def _to_parameters(names: list[str], weights: Update) -> Parameters:
    return ndarrays_to_parameters([weights[n].detach().cpu().numpy() for n in names])


def train(msg: Message, context: Context) -> Message:
    """One round at one site (legacy fit records, which secaggplus_mod masks before they leave the site)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    spec = FederationSpec.from_config(fitins.config)
    site = int(context.node_config["partition-id"])
    data = federation_data(spec)
    images, labels = data.sites[site]
    model = functional_model(received_model(spec, data.num_classes, fitins.config))
    names = [n for n, _ in model.named_parameters()]
    update = site_update(model, _to_tensors(names, fitins.parameters), images, labels, data.num_classes,
                         spec.training, spec.seed, int(fitins.config[ROUND_KEY]), site)
    fitres = FitRes(Status(Code.OK, ""), _to_parameters(names, update), len(labels), {"site": site})
    # secaggplus_mod quantizes this reply with stochastic rounding from numpy's global generator: seeded, a
    # run repeats (a separate stream from the defenses' noise).
    np.random.seed(numpy_global_seed(spec.seed, SECAGG_ROUNDING, int(fitins.config[ROUND_KEY]), site))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def secure_client_app(site_check: bool = True) -> ClientApp:
    """The SecAgg+ site: it checks the model it receives (unless `site_check` is off, to measure what the
    check prevents), then SecAgg+ masks the update `train` computes."""
    client = ClientApp(mods=[model_check_mod, secaggplus_mod] if site_check else [secaggplus_mod])
    client.train()(train)
    return client


app = secure_client_app()  # what deployments start: every site checks


class SecureAuditorFedAvg(LegacyFedAvg):
    """The curious server under SecAgg+: what `aggregate_fit` receives is already the sites' mean update."""

    def __init__(self, spec: FederationSpec, hooks: RoundHooks, names: list[str], initial: Update,
                 score: Callable[[int, Update], tuple[float, dict]], tamper: Tamper | None = None,
                 **options) -> None:
        super().__init__(fraction_evaluate=0.0, min_fit_clients=spec.sites, min_available_clients=spec.sites,
                         initial_parameters=_to_parameters(names, initial), **options)
        self.spec, self.hooks, self.names, self.score, self.tamper = spec, hooks, names, score, tamper
        self.sent: Update = initial
        self.refusals: list[str] = []  # the sites' reasons, once they refused a model the server sent
        self.round = 0  # the round being configured or aggregated

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.sent, self.round = _to_tensors(self.names, parameters), server_round
        tampered = self.tamper(server_round, self.sent) if self.tamper else None
        if tampered is not None:
            self.sent = tampered
            parameters = _to_parameters(list(tampered), tampered)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, fitins in instructions:
            fitins.config.update({**self.spec.to_config(), ROUND_KEY: server_round,
                                  IMPRINT_BINS_KEY: imprint_bins(self.sent)})
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters, dict]:
        if failures or len(results) != self.spec.sites:
            raise RuntimeError(f"Round {server_round}: {len(results)} of {self.spec.sites} sites took part in "
                               "secure aggregation; the configured federation needs all of them.")
        # Every result carries the one unmasked aggregate (secaggplus_mod cleared the site's own arrays).
        mean = _to_tensors(list(self.sent), results[0][1].parameters)
        n_images = sum(fitres.num_examples for _, fitres in results)
        self.hooks.notify(SiteRound(server_round, AGGREGATE, n_images, self.spec.training, self.spec.seed),
                          self.sent, mean)
        new = next_global(self.sent, mean, self.spec.protocol, self.spec.lr)
        return _to_parameters(self.names, new), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        if server_round == 0 or self.refusals:
            return None
        return self.score(server_round, _to_tensors(self.names, parameters))


class CheckedSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ whose server learns why sites refused a round: their error replies carry the model check's
    reason. After a refusal no round runs again (the sites would refuse the same model)."""

    def __init__(self, strategy: SecureAuditorFedAvg, **options) -> None:
        super().__init__(**options)
        self.strategy = strategy

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        if not self.strategy.refusals:
            super().__call__(grid, context)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        carried_on = super().collect_masked_vectors_stage(grid, context, state)
        self.strategy.refusals += list(dict.fromkeys(str(getattr(f.args[0], "reason", f)) for f in state.failures))
        return carried_on


def run_secure_federation(grid: Grid, context: Context, spec: FederationSpec, hooks: RoundHooks | None = None,
                          on_round: RoundCallback | None = None, result: FlowerRun | None = None,
                          tamper: Tamper | None = None) -> FlowerRun:
    """All `spec.rounds` rounds with SecAgg+ over all sites, scoring the global model on the test set each round;
    `tamper` is a malicious server's choice of what to send (default: the global model)."""
    result = result if result is not None else FlowerRun()
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    names = [n for n, _ in model.named_parameters()]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    clock = [time.perf_counter()]

    def score(server_round: int, weights: Update):
        utility = evaluate(model, weights, *data.test)
        record = {"round": server_round, **utility, "seconds": time.perf_counter() - clock[0]}
        result.rounds.append(record)
        result.weights = weights
        if on_round is not None:
            on_round(record, weights)
        clock[0] = time.perf_counter()
        return 0.0, {k: v for k, v in utility.items() if v == v}

    strategy = SecureAuditorFedAvg(spec, hooks or RoundHooks(), names, initial, score, tamper)
    # Every site shares its key with all others and all shares are needed: K sites, no dropouts tolerated.
    # A site's weight is quantized as n / max_weight: the largest site's n keeps the most precision.
    secagg = CheckedSecAggPlus(strategy, num_shares=1.0, reconstruction_threshold=1.0, clipping_range=CLIPPING_RANGE,
                               max_weight=float(max(len(y) for _, y in data.sites)))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=spec.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
    result.refusals = strategy.refusals
    result.refused_round = strategy.round if strategy.refusals else None
    return result


def secure_server_app(spec: FederationSpec, hooks: RoundHooks | None = None, on_round: RoundCallback | None = None,
                      result: FlowerRun | None = None, tamper: Tamper | None = None) -> ServerApp:
    """A ServerApp for an in-Python run (simulation) of `spec` with SecAgg+; `result` receives the outcome."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_secure_federation(grid, context, spec, hooks, on_round, result, tamper)

    return server


# The ServerApp that `flwr run` starts for a deployment with secure aggregation (deploy.write_app).
server = ServerApp()


@server.main()
def deployed(grid: Grid, context: Context) -> None:
    spec, hooks, finished = deployment_settings(context)
    run_secure_federation(grid, context, spec, hooks, finished)

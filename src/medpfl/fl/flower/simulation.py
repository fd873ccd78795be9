"""Run a federation on Flower's simulation runtime from Python, with the curious server's observers in this process."""

from __future__ import annotations

import logging
import os
import warnings

from medpfl.fl.flower.federation import FederationSpec
from medpfl.fl.flower.server_app import FlowerRun, RoundCallback, StrategyWrapper, server_app
from medpfl.errors import MedPFLError
from medpfl.fl.aggregate import weighted_average
from medpfl.fl.model_check import ModelRefused
from medpfl.fl.rounds import RoundHooks, Update, send_as_is


def run_simulation(spec: FederationSpec, hooks: RoundHooks | None = None, weights: Update | None = None,
                   first_round: int = 1, on_round: RoundCallback | None = None, cpus: int | None = None,
                   secure_aggregation: bool = False, client_mods=(),
                   wrap_strategy: StrategyWrapper | None = None, tamper=None, site_check: bool = True) -> FlowerRun:
    """Train `spec` (rounds `first_round`..`spec.rounds`) with one simulated SuperNode per site.

    `client_mods` run around every site's training and `wrap_strategy` wraps the server's strategy: a
    defense's parts, Flower's own (defenses.flower). With `secure_aggregation`, the sites run Flower's
    SecAgg+ and observers receive only the aggregate (fl.flower.secagg; a fresh run only: SecAgg+ runs in
    Flower's legacy API, which starts at round 1).

    `tamper` makes the server malicious (fl.rounds.Tamper): it sends the weights it returns instead of the
    global ones. The sites check every model they receive (ModelRefused
    with their reason when they refuse) unless `site_check` is off, to measure what the check prevents.

    Flower's `run_simulation` is its in-Python entry to the simulation runtime: the ServerApp runs in
    this process, so observers (an attack) receive the sites' replies as Python objects. `flwr run`,
    which starts the ServerApp in a process of its own, is the route for deployments (fl.flower.deploy).
    """
    hooks = hooks or RoundHooks()
    if hooks.site_transform is not send_as_is:
        # A defense must run on the site, in the ClientApp, which a callable in this process cannot reach.
        raise MedPFLError("On the Flower engine a site's defense runs as a ClientApp mod (client_mods), not as "
                          "a site transform in this process; pass its Flower parts, or use --engine inprocess.")
    if secure_aggregation and hooks.aggregate is not weighted_average:
        raise MedPFLError("Under secure aggregation the sites' sample-weighted mean is all the server can form; "
                          "drop the custom aggregator.")
    from flwr.simulation import run_simulation as flower_run_simulation

    if secure_aggregation:
        if weights is not None or first_round != 1:
            raise ValueError("A secure-aggregation run on Flower starts at round 1 from the run's initial model.")
        from medpfl.fl.flower.secagg import secure_client_app, secure_server_app

        client_app = secure_client_app(site_check)
    else:
        from medpfl.fl.flower.client_app import client_app as make_client_app

        client_app = make_client_app(client_mods, site_check)

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no calls home from a hospital's machine
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "logging_level": logging.ERROR,
                             "log_to_driver": False}}
    result = FlowerRun()
    if secure_aggregation:
        server = secure_server_app(spec, hooks, on_round, result, tamper)
    else:
        server = server_app(spec, hooks, weights, first_round, on_round, result, wrap_strategy, tamper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_simulation's deprecation notice points to `flwr run`, see above
        flower_run_simulation(server_app=server, client_app=client_app, num_supernodes=spec.sites,
                              backend_config=backend)
    if result.refusals:
        raise ModelRefused(f"In round {result.refused_round} the sites refused the model the server sent: "
                           f"{'; '.join(result.refusals)}", result.refused_round)
    if not result.weights:
        raise RuntimeError("The Flower simulation ended without a global model; see Flower's log above.")
    return result

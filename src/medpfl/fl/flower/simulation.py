"""Run a federation on Flower's simulation runtime from Python, with the auditor's observer in this process."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable

from medpfl.fl.flower.federation import FederationSpec, Observer
from medpfl.fl.flower.server_app import FlowerRun, server_app


def run_simulation(spec: FederationSpec, observer: Observer | None = None, audit_rounds: Iterable[int] | None = None,
                   audit_sites: Iterable[int] | None = None, cpus: int | None = None) -> FlowerRun:
    """Train `spec` with one simulated SuperNode per site; the observer sees the chosen sites' replies.

    Flower's `run_simulation` is the in-Python entry to the simulation runtime; it runs the ServerApp in
    this process, so the observer (e.g. an attack) receives the replies as Python objects. `flwr run`
    (which starts the ServerApp in a process of its own) is the route for deployments.
    """
    from flwr.simulation import run_simulation as flower_run_simulation
    from flwr.supercore import log as flower_log  # noqa: F401  (configures Flower's logger before we quieten it)

    from medpfl.fl.flower.client_app import app as client_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from a hospital's machine
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cpus = cpus or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "logging_level": logging.ERROR, "log_to_driver": False}}
    result = FlowerRun()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flower_run_simulation(server_app=server_app(spec, observer, audit_rounds, audit_sites, result),
                              client_app=client_app, num_supernodes=spec.sites, backend_config=backend)
    if not result.weights:
        raise RuntimeError("The Flower simulation ended without a global model; see Flower's log above.")
    return result

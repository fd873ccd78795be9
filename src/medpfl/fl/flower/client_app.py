"""The Flower ClientApp: each SuperNode is one site, and its training step is `fl.rounds.site_update`.

The site's index comes from the node's config (`partition-id`, set by the simulation runtime or by
`flower-supernode --node-config`); the run's spec, the global weights and the round come in the message.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model, received_model
from medpfl.fl.flower.model_check_mod import model_check_mod
from medpfl.fl.gradients import functional_model
from medpfl.fl.rounds import site_update
from medpfl.fl.utility import evaluate as score

ROUND_KEY = "medpfl-round"  # the run's round index (Flower's own count restarts at 1 when a run resumes)


def tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors of an ArrayRecord, by name."""
    return dict(arrays.to_torch_state_dict())


def array_record(weights: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of tensors (moved to the CPU: what travels is bytes)."""
    return ArrayRecord({n: w.detach().cpu().contiguous() for n, w in weights.items()})


def _site(context: Context) -> int:
    return int(context.node_config["partition-id"])


def train(msg: Message, context: Context) -> Message:
    """One round at one site: the update of its local training on its own images, and how many it used."""
    config: ConfigRecord = msg.content["config"]
    spec = FederationSpec.from_config(config)
    site = _site(context)
    data = federation_data(spec)
    images, labels = data.sites[site]
    model = functional_model(received_model(spec, data.num_classes, config))
    update = site_update(model, tensors(msg.content["arrays"]), images, labels, data.num_classes, spec.training,
                         spec.seed, int(config[ROUND_KEY]), site)
    metrics = MetricRecord({"num-examples": len(labels), "site": site})
    return Message(content=RecordDict({"arrays": array_record(update), "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """The global model's utility on this site's own images (the server scores the held-out test set itself)."""
    spec = FederationSpec.from_config(msg.content["config"])
    site = _site(context)
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    scores = score(model, tensors(msg.content["arrays"]), *data.sites[site])
    metrics = MetricRecord({**scores, "num-examples": len(data.sites[site][1]), "site": site})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def client_app(mods=(), site_check: bool = True) -> ClientApp:
    """A ClientApp running `train` and `evaluate`: every site first checks the model it receives before its
    data meets it (fl.model_check; off only with `site_check` False, to measure what the check prevents), then
    runs `mods` (e.g. a defense's, by Flower's own mods: defenses.flower)."""
    client = ClientApp(mods=[model_check_mod, *mods] if site_check else list(mods))
    client.train()(train)
    client.evaluate()(evaluate)
    return client


app = client_app()  # what deployments start (fl.flower.deploy): the undefended site

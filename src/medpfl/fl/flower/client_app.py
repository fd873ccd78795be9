"""The Flower ClientApp: each SuperNode is one site, and its training step is `fl.local.local_update`.

The site's index comes from the node's config (`partition-id`, set by the simulation runtime or by
`flower-supernode --node-config`); the run's spec, the global weights and the round come in the message.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medpfl.fl.flower.federation import FederationSpec, accuracy, federation_data, global_model, site_order
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import local_update

app = ClientApp()


def _site(context: Context) -> int:
    return int(context.node_config["partition-id"])


def arrays_to_tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors of an ArrayRecord, by name (float32, as the site sent them)."""
    return dict(arrays.to_torch_state_dict())


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round at one site: the update of its local training on its own images, and how many it used."""
    config: ConfigRecord = msg.content["config"]
    spec = FederationSpec.from_config({k: v for k, v in config.items() if k != "server-round"})
    round_index, site = int(config["server-round"]), _site(context)
    data = federation_data(spec)
    images, labels = data.sites[site]
    order = torch.from_numpy(site_order(spec.seed, round_index, site, len(labels)))
    model = functional_model(global_model(spec, data.num_classes))
    weights = arrays_to_tensors(msg.content["arrays"])
    update = local_update(model, weights, images[order], labels[order], data.num_classes, spec.training)
    reply = RecordDict({
        "arrays": ArrayRecord({n: u.contiguous() for n, u in update.items()}),
        "metrics": MetricRecord({"num-examples": len(labels), "site": site}),
    })
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's accuracy on this site's own images (the server scores the held-out set itself)."""
    config: ConfigRecord = msg.content["config"]
    spec = FederationSpec.from_config({k: v for k, v in config.items() if k != "server-round"})
    site = _site(context)
    data = federation_data(spec)
    images, labels = data.sites[site]
    scores = accuracy(global_model(spec, data.num_classes), arrays_to_tensors(msg.content["arrays"]), images, labels)
    metrics = MetricRecord({**scores, "num-examples": len(labels), "site": site})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

"""The site's model check (fl.model_check) as a Flower ClientApp mod: no training on a model with an anchor.

The first training message a SuperNode receives records the fingerprint of its model in the node's
persistent state; every training message after it must match it and show no imprint or trap signature.
Otherwise the mod answers with an error reply whose reason is the check's one sentence, and the site's
data never meets the model.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.common.constant import ErrorCode

from medpfl.fl.model_check import ModelCheck

STATE_KEY = "medpfl-model-fingerprint"


def received_weights(msg: Message) -> dict[str, torch.Tensor]:
    """Every array the message carries, by name (the modern 'arrays' record or the legacy numbered one)."""
    weights: dict[str, torch.Tensor] = {}
    for record_name, record in msg.content.array_records.items():
        for name, array in record.items():
            weights[f"{record_name}/{name}"] = torch.from_numpy(array.numpy().copy())
    return weights


def model_check_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a training message whose model differs from the first one received or carries an anchor."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.content.array_records:
        return call_next(msg, context)
    stored = context.state.config_records.get(STATE_KEY)
    agreed = None if stored is None else tuple((n, tuple(s), d) for n, s, d in json.loads(stored["fingerprint"]))
    check = ModelCheck(agreed)
    reason = check.verify(received_weights(msg))
    if reason is not None:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    if stored is None:
        context.state.config_records[STATE_KEY] = ConfigRecord({"fingerprint": json.dumps(check.agreed)})
    return call_next(msg, context)

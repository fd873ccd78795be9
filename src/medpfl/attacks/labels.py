"""Recovering the labels behind an update from the gradient of the classifier's last layer.

For cross-entropy with softmax outputs p_j and one-hot labels y_j, the last layer's bias gradient is
the batch mean of (p_j - y_j): entries of classes that are present are pulled below zero, and
B * (mean p - bias gradient) counts how often each class occurs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from medpfl.attacks.threat import ObservedUpdate, ServerPayload
from medpfl.fl.gradients import functional_model


def last_layer(gradients: dict[str, torch.Tensor], num_classes: int) -> tuple[str, str | None]:
    """Names of the classifier's weight (K x F) and bias (K) in the update, last in parameter order."""
    names = list(gradients)
    for i in range(len(names) - 1, -1, -1):
        shape = gradients[names[i]].shape[1:]
        if len(shape) == 2 and shape[0] == num_classes:
            bias = names[i + 1] if i + 1 < len(names) else None
            if bias is not None and gradients[bias].shape[1:] != (num_classes,):
                bias = None
            return names[i], bias
    raise ValueError(f"no K x F classifier weight with K={num_classes} found in the update")


def idlg_labels(update: ObservedUpdate, num_classes: int) -> torch.Tensor:
    """iDLG's rule for one image per victim: the class whose weight-gradient row sums lowest. V x 1."""
    weight, _ = last_layer(update.gradients, num_classes)
    return update.gradients[weight].sum(-1).argmin(-1)[:, None]


def mean_probabilities(payload: ServerPayload, n_probe: int = 32, seed: int = 0) -> torch.Tensor:
    """The attacker's estimate of each victim's average softmax output, from random probe images. V x K."""
    gen = torch.Generator().manual_seed(seed)
    probe = torch.rand(n_probe, *payload.image_shape, generator=gen)
    model = functional_model(payload.model, payload.bn_mode)
    some = next(iter(payload.params.values()))
    probe = probe.to(device=some.device, dtype=some.dtype)

    def probs(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (probe,)).softmax(-1).mean(0)

    with torch.no_grad():
        return vmap(probs)(payload.params)


def count_labels(update: ObservedUpdate, payload: ServerPayload) -> torch.Tensor:
    """Labels of a batch with repeats, from how far each class's bias gradient sits below the mean
    softmax output. Every class with a negative bias gradient is present at least once. V x B, sorted."""
    K, B = payload.num_classes, update.batch_size
    weight, bias = last_layer(update.gradients, K)
    if bias is not None:
        g = update.gradients[bias]
        estimate = B * (mean_probabilities(payload).to(g.dtype) - g)
    else:  # without a bias, the weight gradient's row sums carry the same signs but no counts
        g = update.gradients[weight].sum(-1)
        estimate = -g
    present = g < 0
    # Classes whose gradient says "present" get one each (as many as fit, most negative first) ...
    order = g.argsort(-1)
    counts = torch.zeros_like(g, dtype=torch.long)
    for v in range(g.shape[0]):
        for k in order[v][present[v][order[v]]][:B].tolist():
            counts[v, k] = 1
        # ... and the rest go where the estimated count exceeds what is assigned by the most.
        for _ in range(B - int(counts[v].sum())):
            counts[v, int((estimate[v] - counts[v]).argmax())] += 1
    labels = [torch.repeat_interleave(torch.arange(K, device=g.device), counts[v]) for v in range(g.shape[0])]
    return torch.stack(labels)


def recover_labels(update: ObservedUpdate, payload: ServerPayload) -> torch.Tensor:
    """The labels the attacker works with: granted ones, iDLG's rule for B = 1, counts for B > 1."""
    if update.labels is not None:
        return update.labels
    if update.batch_size == 1:
        return idlg_labels(update, payload.num_classes)
    return count_labels(update, payload)

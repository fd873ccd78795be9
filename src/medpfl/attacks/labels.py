"""Recovering the labels behind an update from the gradient of the classifier's last layer.

For cross-entropy with softmax outputs p_j and one-hot labels y_j, the last layer's bias gradient is
the batch mean of (p_j - y_j): entries of classes that are present are pulled below zero, and
B * (mean p - bias gradient) counts how often each class occurs.

A FedAvg weight change is minus the learning rate times a weighted sum of such gradients, one per local
step; rescaled to the mean gradient it sums, the same rules read it. The softmax estimate behind the
counts then follows the weights from the start to the end of local training (after Dimitrov et al.
2022, who count labels in FedAvg updates from the softmax over the course of local training).
"""

from __future__ import annotations

from dataclasses import replace

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


def count_labels(update: ObservedUpdate, payload: ServerPayload, probabilities: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """Labels of a batch with repeats, from how far each class's bias gradient sits below the mean
    softmax output (`probabilities`, V x K; by default estimated at the payload's weights). Every class
    with a negative bias gradient is present at least once. V x B, sorted."""
    K, B = payload.num_classes, update.batch_size
    weight, bias = last_layer(update.gradients, K)
    if bias is not None:
        g = update.gradients[bias]
        if probabilities is None:
            probabilities = mean_probabilities(payload)
        estimate = B * (probabilities.to(g.dtype) - g)
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


def step_weights(steps: int, momentum: float) -> torch.Tensor:
    """How much each local step's gradient moves the weights in the end, in units of the learning rate.

    Heavy-ball SGD (v_t = m v_(t-1) + g_t, w_t = w_(t-1) - lr v_t) carries step s's gradient into every
    later step: the weight change is -lr * sum_s (1 - m^(T-s+1)) / (1 - m) * g_s.
    """
    if momentum == 0:
        return torch.ones(steps, dtype=torch.float64)
    remaining = torch.arange(steps, 0, -1, dtype=torch.float64)  # T - s + 1 for s = 1..T
    return (1 - momentum**remaining) / (1 - momentum)


def as_mean_gradient(update: ObservedUpdate, payload: ServerPayload) -> ObservedUpdate:
    """A FedAvg weight change rescaled to the mean gradient it sums: -update / (lr * total step weight).

    Exact for the last layer's bias when the softmax outputs stay put during local training; the sign
    flip turns "weights moved towards a class" back into the gradient's "negative for present classes".
    """
    training = payload.local_training
    total = float(step_weights(training.steps(update.batch_size), training.momentum).sum())
    scale = -1.0 / (training.lr * total)
    return replace(update, gradients={n: scale * u for n, u in update.gradients.items()})


def softmax_along_local_training(update: ObservedUpdate, payload: ServerPayload) -> torch.Tensor:
    """The attacker's estimate of the mean softmax output over a FedAvg site's local steps. V x K.

    The steps were taken at weights between the start (the payload) and the end (payload + weight change);
    the attacker places step s at s/T of the way, a straight line, and weighs each as it moved the weights.
    """
    # Chosen over the start-only and the start/end-average estimates by benchmarks/fedavg_label_counts.py
    # (embedded set and dermoscopy patches): the best mean accuracy of the three, not the best everywhere.
    training = payload.local_training
    steps = training.steps(update.batch_size)
    weights = step_weights(steps, training.momentum)
    total = 0
    for s, weight in enumerate(weights.tolist()):
        at = replace(payload, params={n: p + (s / steps) * update.gradients[n] for n, p in payload.params.items()})
        total = total + weight * mean_probabilities(at)
    return total / float(weights.sum())


def recover_labels(update: ObservedUpdate, payload: ServerPayload) -> torch.Tensor:
    """The labels the attacker works with: granted ones, iDLG's rule for B = 1, counts for B > 1.

    A FedAvg weight change is first rescaled to a mean gradient, and the softmax estimate behind the
    counts follows the weights along the site's local training."""
    if update.labels is not None:
        return update.labels
    probabilities = None
    if payload.local_training.protocol == "fedavg":
        if update.batch_size > 1:
            probabilities = softmax_along_local_training(update, payload)
        update = as_mean_gradient(update, payload)
    if update.batch_size == 1:
        return idlg_labels(update, payload.num_classes)
    return count_labels(update, payload, probabilities)

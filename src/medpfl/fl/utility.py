"""What federated training buys: the global model's accuracy, balanced accuracy and macro AUC on held-out images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose highest-scoring class is the true one."""
    return float(np.mean(scores.argmax(1) == labels))


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the share of their images classified correctly."""
    predicted = scores.argmax(1)
    return float(np.mean([np.mean(predicted[labels == k] == k) for k in np.unique(labels)]))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (P N)); NaN when either class is absent."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes present in `labels` (classes with no test image are skipped)."""
    aucs = [binary_auc(scores[:, k], labels == k) for k in np.unique(labels)]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def chance_levels(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """What a model that ignores the image scores: always the majority class (accuracy), 1/K present
    classes (balanced accuracy), 0.5 (AUC)."""
    counts = np.bincount(labels, minlength=num_classes)
    return {"accuracy": float(counts.max() / counts.sum()), "balanced_accuracy": 1.0 / int((counts > 0).sum()),
            "auc": 0.5}


def predict(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
            batch_size: int = 256) -> np.ndarray:
    """Softmax class probabilities of `model` with weights `params` on `images` (N x C x H x W), as N x K."""
    with torch.no_grad():
        chunks = [torch.softmax(functional_call(model, params, (images[i:i + batch_size],)), -1)
                  for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double().cpu().numpy()


def evaluate(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC of the model on a labelled test set."""
    scores, truth = predict(model, params, images), labels.cpu().numpy()
    return {"accuracy": accuracy(scores, truth), "balanced_accuracy": balanced_accuracy(scores, truth),
            "auc": macro_auc(scores, truth)}

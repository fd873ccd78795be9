"""The plain per-image references of the benchmark: the papers' loop and the lean one end in the same place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medpfl.attacks.gradient_matching import PAPER_PROCEDURE, GradientMatchingSettings
from medpfl.attacks.reference import reference_gradient_matching
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.fl.gradients import soft_cross_entropy
from medpfl.models.registry import build_model


def one_victim():
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 1, seed=4), size=16).load_batch([0])
    K = len(source.classes)
    model = build_model("lenet-idlg", K, 3, 16, seed=1)
    # The site's gradient by the very operations the references evaluate, so the true image scores 0 exactly.
    loss = soft_cross_entropy(model(x), F.one_hot(y, K).float())
    return model, list(torch.autograd.grad(loss, list(model.parameters()))), x, y, K


def test_lean_reference_follows_the_papers_loop_to_the_same_images():
    model, observed, x, y, K = one_victim()
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    settings = GradientMatchingSettings(steps=4, **PAPER_PROCEDURE)
    paper = reference_gradient_matching(model, observed, start, y, K, settings)
    model.zero_grad(set_to_none=True)
    lean = reference_gradient_matching(model, observed, start, y, K, settings, lean=True)
    assert torch.equal(paper[0], lean[0])
    assert all(p.grad is None for p in model.parameters())  # the lean loop differentiates the image only


def test_lean_reference_stops_once_converged_where_the_papers_loop_goes_on():
    """From the true image the distance is zero at once: the papers' loop still calls L-BFGS 300 times."""
    model, observed, x, y, K = one_victim()
    settings = GradientMatchingSettings(**PAPER_PROCEDURE)
    *_, paper_evaluations = reference_gradient_matching(model, observed, x, y, K, settings)
    image, _, _, lean_evaluations = reference_gradient_matching(model, observed, x, y, K, settings, lean=True)
    assert paper_evaluations == 300 and lean_evaluations == 1
    assert torch.equal(image, x)

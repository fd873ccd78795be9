"""The model a victim computes its update on: drawn fresh, loaded from a saved state, or trained first;
and, on the scorer's side, how confident that model is on the victim's true labels."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from medpfl.errors import MedPFLError
from medpfl.fl.gradients import functional_model


def load_model_state(model: nn.Module, path: str | os.PathLike[str], what: str) -> None:
    """Load the state dict saved at `path` into `model` (tensors only, never unpickled objects);
    `what` names the model's options for the error message."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedPFLError(f"--model-state '{path}' does not exist; pass a file saved with "
                          f"torch.save(model.state_dict(), PATH).") from None
    except Exception:  # noqa: BLE001 - any unreadable file gets the same advice
        raise MedPFLError(f"--model-state '{path}' is not a file torch.save wrote, or holds objects besides "
                          f"tensors; save one with torch.save(model.state_dict(), PATH).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedPFLError(f"--model-state '{path}' holds no state dict (names to tensors); save one with "
                          f"torch.save(model.state_dict(), PATH).")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [n for n in own if n in state and state[n].shape != own[n].shape]
    if missing or unexpected or wrong:
        if wrong:
            n = wrong[0]
            detail = f"'{n}' is {tuple(state[n].shape)} in the file but {tuple(own[n].shape)} in the model"
        else:
            detail = f"'{(missing or unexpected)[0]}' is {'missing from' if missing else 'unknown to'} the model's state"
        raise MedPFLError(f"--model-state '{path}' does not fit {what} ({detail}); pass the --model, --image-size, "
                          f"--channels and classes it was trained with.")
    model.load_state_dict(state)


def pretrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch_size: int,
             generator: torch.Generator) -> None:
    """Train `model` in place: `steps` plain SGD steps of cross-entropy on minibatches drawn with
    `generator` from `images` (N x C x H x W) and `labels` (N), BatchNorm tracking its statistics."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator).to(images.device)
        optimizer.zero_grad()
        F.cross_entropy(model(images[pick]), labels[pick]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)


def true_class_probability(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
                           labels: torch.Tensor, bn_mode: str) -> torch.Tensor:
    """Each victim's model's softmax output on its true labels, V x B, in float64 (so that 1 - p is exact
    down to 1e-16: a confident model's update scales with 1 - p). Ground truth: the scorer's side only."""
    fmodel = functional_model(model, bn_mode).double()
    params64 = {n: p.double() for n, p in params.items()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in fmodel.named_buffers()}

    def victim(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(fmodel, ({**p, **buffers},), (x,))
        return logits.softmax(-1).gather(1, y[:, None])[:, 0]

    with torch.no_grad():
        return vmap(victim)(params64, images.double(), labels)


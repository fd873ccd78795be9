"""Which device a run uses: `auto` takes the GPU when there is one."""

from __future__ import annotations

import torch

from medpfl.errors import MedPFLError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA if available, else Apple's MPS if available, else the CPU; any other name is checked
    (e.g. `cuda:1`) and refused in one sentence when this machine lacks it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MedPFLError(f"--device '{name}' is not a device name; use auto, cpu, cuda, cuda:1 or mps.") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise MedPFLError(f"--device {name}: this machine has no such CUDA device; use --device auto or cpu.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MedPFLError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu.")
    return device

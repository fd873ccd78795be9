"""The Flower engine (optional extra): a ClientApp per site, a ServerApp whose strategy is the curious server.

Import the submodules only after `require_flower()`: they import flwr, which MedPFL does not need otherwise.
"""

from __future__ import annotations

from medpfl.errors import MedPFLError

INSTALL_HINT = "--engine flower needs Flower; install with pip install -e '.[flower]'."


def require_flower() -> None:
    """Raise a one-sentence MedPFLError when flwr is not installed."""
    try:
        import flwr.serverapp  # noqa: F401
    except ImportError as exc:
        raise MedPFLError(INSTALL_HINT) from exc

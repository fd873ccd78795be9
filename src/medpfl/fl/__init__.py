"""Federated learning: what sites compute from the server payload and what they share."""

"""MedPFL: what a curious server can reconstruct of patients' images from federated updates."""

__version__ = "0.1.0"

"""Tensorboard and console metrics; pass@k, cons@k, avg@k."""

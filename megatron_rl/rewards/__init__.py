"""Reward functions from a sample to a score, and their registry."""

"""Pure-torch RL math: advantages, policy losses, KL, aggregation, sample shaping."""

"""megatron-rl: RL post-training (GRPO/DAPO/GDPO) for Mixture-of-Experts LMs on Megatron-Core."""

__version__ = "0.1.0"

"""Megatron-Core side: parallel init, CPU compat, model builders, forward/backward, checkpoints."""

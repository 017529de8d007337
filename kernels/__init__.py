"""Fused Triton kernels with torch references, installed as `megatron_rl.kernels`."""
